"""Compile every Triton kernel configuration lce launches for a GPU target, without a GPU, and read what it costs.

``python -m lce.kernels.inspect`` compiles each configuration ahead of time (``triton.compile`` with
``GPUTarget("cuda", 90, 32)``; ``--arch 80`` for an A100) and reads the machine code with the ``cuobjdump`` and
``ptxas`` Triton bundles: registers per thread, spill bytes (``ptxas -v``), shared memory per block, tensor-core
instructions (``HGMMA`` = Hopper wgmma, ``HMMA`` = mma.sync), ``MUFU.EX2`` and sin/cos (fast ``MUFU.SIN/COS`` or
precise libdevice sequences), and the blocks per SM those allow. Every figure is static: compiled, not measured on a
GPU; instruction counts are for the whole kernel (the main loop is most of it, but not all).

The configurations come from the code that launches them: the attention kernels' arguments from
``triton_forward.forward_launch`` and ``triton_backward.backward_launches`` (on meta tensors, with specs built by the
position encodings' own segment builders), the tiles from ``attention.launch``, linear attention's from the constants
its launcher uses, cross-entropy's from ``triton_linear_cross_entropy.chunk_launch``. So a configuration checked here
is one lce runs.

``check_row`` lists what a GPU would reject or run badly: shared memory over the per-block limit, register spills in
a bf16/fp16 kernel (beyond the recorded ``KNOWN_SPILLS``, empty today), a bf16/fp16 matmul without a
tensor-core instruction; ``tests/kernels/test_compile_check.py`` fails on any of them. Results of a full run:
``experiments/results/kernels/compile/``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch

from lce.errors import LceError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_DIMS = (64, 128, 256)
ATTENTION_KERNELS = ("forward", "decode", "backward_dq", "backward_dk_dv")
#: Representative shapes: GQA 32/8 query/KV heads at 16k tokens (only divisibility and the constexprs matter).
HEADS, KV_HEADS, LENGTH = 32, 8, 16384


@dataclass(frozen=True)
class Target:
    """A GPU's per-block and per-SM limits (CUDA occupancy rules: registers in 256-per-warp units, 1 KB of shared
    memory reserved per block)."""

    name: str
    arch: int
    shared_per_block: int
    shared_per_sm: int
    regs_per_sm: int = 65_536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32


TARGETS = {
    "sm_90": Target("sm_90", 90, shared_per_block=232_448, shared_per_sm=233_472),  # H100/H200: 227 / 228 KB
    "sm_80": Target("sm_80", 80, shared_per_block=166_912, shared_per_sm=167_936),  # A100: 163 / 164 KB
    "sm_86": Target("sm_86", 86, shared_per_block=101_376, shared_per_sm=102_400, threads_per_sm=1536,
                    blocks_per_sm=16),  # RTX 30xx / A10 / A40 (and the 99 KB class: sm_89, sm_120): 99 / 100 KB
}


@dataclass
class Config:
    """One kernel compilation: what lce would launch for ``case``.

    Attributes:
        kernel: the kernel's name in the table (``attention_forward``, ``attention_backward_dq``, ...).
        case: the method(s) it serves (``causal``, ``dca (3 segments)``, ...).
        fn: the ``@triton.jit`` function.
        kwargs: the launch's keyword arguments (tensors may be meta tensors; ``num_warps``/``num_stages`` included).
        tensor_cores: whether it multiplies bf16/fp16 tiles (so a tensor-core instruction must appear).
        refused: the ``LceError`` lce raises instead of launching it (nothing is compiled), or empty.
    """

    kernel: str
    case: str
    dtype: str
    head_dim: int
    fn: Callable | None
    kwargs: dict
    tensor_cores: bool
    refused: str = ""

    @property
    def key(self) -> str:
        return f"{self.kernel}/{self.case}/{self.dtype}/d{self.head_dim}"


@dataclass
class Row:
    """What one configuration compiles to (static figures)."""

    kernel: str
    case: str
    dtype: str
    head_dim: int
    target: str
    tiles: str = ""
    num_warps: int = 0
    num_stages: int = 0
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0
    shared_limit: int = 0
    hgmma: int = 0
    hmma: int = 0
    mufu_ex2: int = 0
    mufu_sincos: int = 0
    sincos_ops: int = 0
    precise_trig: bool = False
    blocks_per_sm: int = 0
    tensor_cores_expected: bool = False
    refused: str = ""
    error: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.kernel}/{self.case}/{self.dtype}/d{self.head_dim}"



def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def segment_cases(scale: float, rotary) -> list[tuple[str, object]]:
    """``(case, AttentionSpec)`` of every registered position-remapping method (``lce.posenc.SegmentMethod``) with
    its default parameters on an 8192-token model, as its layer is data (``SegmentMethod.layer``): its segments and
    any pattern of its own (StreamingLLM's window and sinks). The compiled kernel depends on the segment count, the
    rotary layout and the pattern's presence only."""
    from lce.kernels.attention.spec import AttentionSpec
    from lce.posenc import POSENCS, SegmentMethod

    cases = []
    for name in POSENCS:
        if not issubclass(POSENCS.get(name), SegmentMethod):
            continue
        layer = POSENCS.build(name).layer(8192)
        pattern = {"window": layer.window, "sink_tokens": layer.sink_tokens} if layer.window is not None else {}
        label = f"{name} ({len(layer.segments)} segments{' + window' if pattern else ''})"
        cases.append((label, AttentionSpec(scale, segments=layer.segments, rotary=rotary, **pattern)))
    return cases


def attention_cases(head_dim: int) -> list[tuple[str, object]]:
    """``(case, AttentionSpec)`` for every modifier and segment count lce passes to ``flash_attention``, the
    segments built by the position encodings' own builders (their values are runtime data; the compiled kernel
    depends on the segment count and the rotary layout only)."""
    from lce.kernels.attention.spec import IDENTITY, AttentionSpec, PairSelect, Segment
    from lce.kernels.rope.rotation import Rotation

    scale = head_dim ** -0.5
    rotary = Rotation(1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    mask = torch.ones(LENGTH // 128, LENGTH // 128, dtype=torch.bool).tril()
    return [
        ("causal", AttentionSpec(scale)),
        ("alibi", AttentionSpec(scale, alibi_slopes=torch.ones(HEADS))),
        ("logn", AttentionSpec(scale, logn_length=4096)),
        ("window+sinks", AttentionSpec(scale, window=4096, sink_tokens=4)),
        ("block_mask", AttentionSpec(scale, block_mask=mask, block_size=128)),
        ("all modifiers", AttentionSpec(scale, alibi_slopes=torch.ones(HEADS), logn_length=4096, window=4096,
                                        sink_tokens=4, block_mask=mask, block_size=128)),
        ("rope in kernel (1 segment)", AttentionSpec(scale, segments=(Segment(IDENTITY, IDENTITY, PairSelect()),),
                                                     rotary=rotary)),
    ] + segment_cases(scale, rotary)


def _attention_config(kernel: str, case: str, dtype: str, head_dim: int, spec, tq: int, block_m: int, block_n: int,
                      options: dict | None, packed: bool, capability: tuple[int, int]) -> list[Config]:
    """The launches of one attention kernel on meta tensors, as ``flash_attention`` would make them (the dk/dv
    kernel runs as two launches at head dim 256)."""
    from lce.kernels.attention.launch import backward_tiles
    from lce.kernels.attention.schedule import TileSchedule
    from lce.kernels.attention.triton_backward import (
        attention_bwd_dk_dv_kernel,
        attention_bwd_dq_kernel,
        backward_launches,
    )
    from lce.kernels.attention.triton_common import distinct_maps
    from lce.kernels.attention.triton_forward import attention_fwd_kernel, forward_launch

    torch_dtype = DTYPES[dtype]
    tensor_cores = torch_dtype != torch.float32
    q_maps, k_maps, _, _ = distinct_maps(spec.segments)
    slots = max(1, len(spec.segments))
    n_qt, n_kt = -(-tq // block_m), -(-LENGTH // block_n)
    index = torch.int16 if n_kt <= 32767 and n_qt <= 32767 else torch.int32
    schedule = TileSchedule(block_m, block_n, _meta((slots, 1, n_qt), torch.int32),
                            _meta((slots, 1, n_qt), torch.int32), _meta((slots, 1, n_qt, n_kt), index),
                            _meta((slots, 1, n_kt), torch.int32), _meta((slots, 1, n_kt), torch.int32),
                            _meta((slots, 1, n_kt, n_qt), index))
    q = _meta((max(1, len(q_maps)), 1, HEADS, tq, head_dim), torch_dtype)
    k = _meta((max(1, len(k_maps)), 1, KV_HEADS, LENGTH, head_dim), torch_dtype)
    v = _meta((1, KV_HEADS, LENGTH, head_dim), torch_dtype)
    q_pos, k_pos = _meta((1, tq), torch.int32), _meta((1, LENGTH), torch.int32)
    lse = _meta((1, HEADS, tq), torch.float32)
    grad_dtype = torch.float32 if spec.segments else torch_dtype
    try:
        if kernel in ("forward", "decode"):
            n_splits = 8 if kernel == "decode" else 1
            out = _meta((1, tq, HEADS, head_dim), torch_dtype if n_splits == 1 else torch.float32)
            _, kwargs = forward_launch(q, k, v, out, lse, lse, lse, spec, q_pos, k_pos, schedule, n_splits, packed,
                                       capability, options)
            fn = attention_fwd_kernel
        else:
            part = kernel.removeprefix("backward_")
            dq = _meta((slots, 1, HEADS, tq, head_dim), grad_dtype)
            dk = _meta((slots, 1, KV_HEADS, LENGTH, head_dim), grad_dtype)
            dv = _meta((slots, 1, KV_HEADS, LENGTH, head_dim), grad_dtype)
            out = _meta((1, tq, HEADS, head_dim), torch_dtype)
            tiles = backward_tiles(torch.device("cuda"), torch_dtype, head_dim)
            dk_dv_m, dk_dv_n = tiles["dk_dv"]
            dk_dv_kt = -(-LENGTH // dk_dv_n)
            dk_dv_lists = TileSchedule(dk_dv_m, dk_dv_n, None, None, None, None,
                                       _meta((slots, 1, dk_dv_kt), torch.int32),
                                       _meta((slots, 1, dk_dv_kt, -(-tq // dk_dv_m)), index))
            launches = backward_launches(q, k, v, out, lse, lse, dq, dk, dv, spec, q_pos, k_pos, schedule,
                                         dk_dv_lists, capability)
            if part == "dq":
                return [Config(f"attention_{kernel}", case, dtype, head_dim, attention_bwd_dq_kernel,
                               launches["dq"][1], tensor_cores)]
            # dk and dv in one launch, or two at head dim 256 (launch.dk_dv_parts)
            return [Config(f"attention_backward_{name}", case, dtype, head_dim, attention_bwd_dk_dv_kernel,
                           launches[name][1], tensor_cores) for name in launches if name != "dq"]
    except LceError as e:  # lce refuses this configuration on the target: nothing to compile
        return [Config(f"attention_{kernel}", case, dtype, head_dim, None, {}, tensor_cores, str(e))]
    return [Config(f"attention_{kernel}", case, dtype, head_dim, fn, kwargs, tensor_cores)]


def attention_configs(dtype: str, head_dim: int, target: Target, cases: Iterable[str] | None = None,
                      kernels: Iterable[str] = ATTENTION_KERNELS) -> list[Config]:
    """The attention launches for one dtype and head dim, as ``flash_attention`` would make them on ``target``: the
    launch table's shape for every kernel, and for the forward also each other shape the tuner may pick."""
    from lce.kernels.attention import tuning
    from lce.kernels.attention.launch import backward_tiles, gqa_packing, tile_sizes

    torch_dtype = DTYPES[dtype]
    capability = (target.arch // 10, target.arch % 10)
    kernels = tuple(kernels)
    wanted = None if cases is None else set(cases)
    configs = []
    for case, spec in attention_cases(head_dim):
        if wanted is not None and case not in wanted:
            continue
        for kernel in kernels:
            tq = 1 if kernel == "decode" else LENGTH
            block_m, block_n = tile_sizes(tq, torch.device("cuda"), torch_dtype, head_dim)
            if kernel.startswith("backward"):
                block_m, block_n = backward_tiles(torch.device("cuda"), torch_dtype, head_dim)["dq"]
            packed = gqa_packing(tq, HEADS // KV_HEADS, torch.device("cuda"))
            shapes = [(packed or block_m, block_n, None, "")]
            if kernel == "forward":  # the tuner's other candidates (tuning.py), each compiled as it would launch
                extra = tuning.candidates(torch_dtype, head_dim, capability, spec.block_mask is not None,
                                          len(spec.segments))[1:]
                shapes += [(c.block_m, c.block_n, c.options, f" [{c}]") for c in extra]
            for block_m, block_n, options, label in shapes:
                configs += _attention_config(kernel, case + label, dtype, head_dim, spec, tq, block_m, block_n,
                                             options, packed is not None, capability)
    return configs


def attention_helper_configs(dtype: str, head_dim: int) -> list[Config]:
    """The two small attention kernels beside the main ones: the backward's ``delta = rowsum(dO * O)`` pre-kernel
    and flash-decoding's split merge (no matrix products: no tensor-core instruction expected)."""
    from lce.kernels.attention.triton_backward import attention_bwd_delta_kernel
    from lce.kernels.attention.triton_forward import combine_splits_kernel

    torch_dtype = DTYPES[dtype]
    o = _meta((1, LENGTH, HEADS, head_dim), torch_dtype)
    f32 = _meta((1,), torch.float32)
    block_dv = max(16, 1 << (head_dim - 1).bit_length())
    return [
        Config("attention_backward_delta", "causal", dtype, head_dim, attention_bwd_delta_kernel,
               {"OUT": o, "DO": o, "DELTA": f32, "H": HEADS, "Tq": LENGTH, "DV": head_dim, "BLOCK_M": 64,
                "BLOCK_DV": block_dv}, False),
        Config("attention_decode_combine", "causal", dtype, head_dim, combine_splits_kernel,
               {"M_PART": f32, "L_PART": f32, "ACC": f32, "OUT": o, "LSE": f32, "rows_total": HEADS, "H": HEADS,
                "Tq": 1, "DV": head_dim, "n_splits": 8, "BLOCK_S": 8, "BLOCK_DV": block_dv}, False),
    ]


def linear_attention_configs(dtype: str, features: int) -> list[Config]:
    """The chunked linear-attention kernels at ``F = E = features``, chunk 64, with decay and an initial state: what
    ``linear_attention`` launches (``triton_chunk`` kernels; the normaliser is a running key sum beside the state, no
    extra value channel). bf16/fp16 dots run on tensor cores; fp32 dots are IEEE by design (the exactness path)."""
    from lce.kernels.linear_attention import triton_chunk as tc
    from lce.kernels.linear_attention.function import MAX_TRITON_CHUNK, triton_chunk

    torch_dtype = DTYPES[dtype]
    chunk = triton_chunk(MAX_TRITON_CHUNK)
    bk, bv = tc._tiles(features, features)
    nt = LENGTH // chunk
    x = _meta((1, HEADS, LENGTH, features), torch_dtype)  # q, k, v, o, do, dv
    per_position = _meta((1, HEADS, LENGTH), torch_dtype)  # den, dden
    b = _meta((1, HEADS, LENGTH), torch.float32)
    states = _meta((1, HEADS, nt, features, features), torch_dtype)  # h_n, D_n: dot operands
    z_states = _meta((1, HEADS, nt, features), torch.float32)
    initial, initial_z = _meta((1, HEADS, features, features), torch_dtype), _meta((1, HEADS, features), torch_dtype)
    final, final_z = _meta((1, HEADS, features, features), torch.float32), _meta((1, HEADS, features), torch.float32)
    grad = _meta((1, HEADS, LENGTH, features), torch.float32)  # dq, dk
    sizes = dict(T=LENGTH, F=features, E=features, NT=nt, C=chunk, BK=bk, BV=bv, USE_DECAY=True,
                 **tc.launch_options(torch_dtype))
    launches = [
        ("chunk_state_fwd", tc.chunk_state_fwd_kernel,
         {"k_ptr": x, "v_ptr": x, "b_ptr": b, "h0_ptr": initial, "z0_ptr": initial_z, "h_ptr": states,
          "z_ptr": z_states, "ht_ptr": final, "zt_ptr": final_z, "HAS_INITIAL": True, "STORE_STATES": True}),
        ("chunk_output_fwd", tc.chunk_output_fwd_kernel,
         {"q_ptr": x, "k_ptr": x, "v_ptr": x, "b_ptr": b, "h_ptr": states, "z_ptr": z_states, "o_ptr": x,
          "den_ptr": per_position}),
        ("chunk_state_bwd", tc.chunk_state_bwd_kernel,
         {"q_ptr": x, "do_ptr": x, "dden_ptr": per_position, "b_ptr": b, "dht_ptr": final, "dzt_ptr": final_z,
          "dh_ptr": states, "dz_ptr": z_states, "dh0_ptr": final, "dz0_ptr": final_z}),
        ("chunk_dv_bwd", tc.chunk_dv_bwd_kernel,
         {"q_ptr": x, "k_ptr": x, "b_ptr": b, "do_ptr": x, "dh_ptr": states, "dv_ptr": x}),
        ("chunk_dqk_bwd", tc.chunk_dqk_bwd_kernel,
         {"q_ptr": x, "k_ptr": x, "v_ptr": x, "b_ptr": b, "h_ptr": states, "z_ptr": z_states, "do_ptr": x,
          "dden_ptr": per_position, "dh_ptr": states, "dz_ptr": z_states, "dq_ptr": grad, "dk_ptr": grad}),
    ]
    return [Config(f"linear_attention_{name}", f"decay, chunk {chunk}", dtype, features, fn, dict(args, **sizes),
                   tensor_cores=torch_dtype != torch.float32) for name, fn, args in launches]


def cross_entropy_configs(dtype: str, hidden_size: int = 4096, vocab: int = 128_256) -> list[Config]:
    """The fused cross-entropy's row kernel on one chunk of logits (the launcher's default chunk of a Llama-3
    vocabulary): the loss alone (no gradient), the loss and dS (the forward under autograd) without and with a
    soft-cap, and dS weighted per row (the backward's recomputation). The matmuls around it are cuBLAS's, so the
    kernel multiplies no tiles."""
    from lce.kernels.cross_entropy import triton_linear_cross_entropy as ce
    from lce.kernels.cross_entropy.function import DEFAULT_CHUNK_SIZE as rows

    logits = _meta((rows, vocab), DTYPES[dtype])
    targets, vec = _meta((rows,), torch.int64), _meta((rows,), torch.float32)
    launches = [("cross_entropy_fwd", "loss only", None, False, None),
                ("cross_entropy_fwd_grad", "loss and dS", None, True, None),
                ("cross_entropy_fwd_grad", "loss and dS, softcap", 30.0, True, None),
                ("cross_entropy_bwd_recompute", "dS weighted per row", None, True, vec)]
    configs = []
    for kernel, case, softcap, grad, scale in launches:
        _, kwargs = ce.chunk_launch(logits, targets, scale, vec, 1.0, softcap, grad)
        configs.append(Config(kernel, case, dtype, hidden_size, ce.lce_chunk_kernel, kwargs, tensor_cores=False))
    return configs


def rope_configs(dtype: str, head_dim: int) -> list[Config]:
    """The fused RoPE kernel (queries and keys of one row per program), full rotary, half style."""
    from lce.kernels.rope import triton_rope as tr

    torch_dtype = DTYPES[dtype]
    q = _meta((1, HEADS, LENGTH, head_dim), torch_dtype)
    k = _meta((1, KV_HEADS, LENGTH, head_dim), torch_dtype)
    pos, inv_freq = _meta((1, LENGTH), torch.int64), _meta((head_dim // 2,), torch.float32)
    kwargs = tr.rope_launch(q, k, q, k, pos, inv_freq, 1.0, "half", False)[1]
    return [Config("rope_fwd", "q and k, half style", dtype, head_dim, tr.rope_fwd_kernel, kwargs, False)]


def selected_attention_configs(dtype: str, head_dim: int, block_size: int = 64, slots: int = 16) -> list[Config]:
    """Selected-block attention's kernels (``selected_attention.triton_selected``: forward, backward dq, backward
    dk/dv) at block ``block_size`` with ``slots`` selected blocks per row, for both selection layouts: one selection
    shared by each GQA group (NSA: the ``HEADS / KV_HEADS`` query heads of a token form the query tile) and one per
    query head (MoBA, Quest: a one-row tile padded to 16; the dk/dv kernel gathers 32 listed rows of one head).
    Arguments from the launchers ``forward_launch`` and ``backward_launches``, so the warps and stages are the ones
    lce launches. Also the key-block-major forward and dq kernels (``selected_attention.triton_block_major``) at this
    block and at MoBA's 512 (walked in sub-tiles), and the forward's fused merge of the partial softmaxes."""
    from lce.kernels.selected_attention import triton_block_major as bm
    from lce.kernels.selected_attention import triton_selected as ts

    torch_dtype = DTYPES[dtype]
    tensor_cores = torch_dtype != torch.float32
    q = _meta((1, HEADS, LENGTH, head_dim), torch_dtype)
    k = _meta((1, KV_HEADS, LENGTH, head_dim), torch_dtype)
    q_pos, lse = _meta((1, LENGTH), torch.int64), _meta((1, HEADS, LENGTH), torch.float32)
    offsets = _meta((KV_HEADS * LENGTH // block_size + 1,), torch.int32)
    configs = []
    for case, sel_heads in ((f"shared per GQA group, block {block_size}", KV_HEADS),
                            (f"per query head, block {block_size}", HEADS)):
        index = _meta((1, sel_heads, LENGTH, slots), torch.int32)
        rows = _meta((sel_heads * LENGTH * slots,), torch.int32)
        _, fwd = ts.forward_launch(q, k, k, index, q_pos, q, lse, block_size, head_dim ** -0.5)
        launches = ts.backward_launches(q, k, k, q, q, lse, lse, index, q_pos, rows, offsets, q, k, k, block_size,
                                        head_dim ** -0.5)
        configs += [Config("selected_attention_fwd", case, dtype, head_dim, ts.selected_fwd_kernel, fwd, tensor_cores),
                    Config("selected_attention_bwd_dq", case, dtype, head_dim, ts.selected_bwd_dq_kernel,
                           launches["dq"][1], tensor_cores),
                    Config("selected_attention_bwd_dk_dv", case, dtype, head_dim, ts.selected_bwd_dk_dv_kernel,
                           launches["dk_dv"][1], tensor_cores)]
        o_part = _meta((1, HEADS, LENGTH, slots, head_dim), torch.float32)
        lse_part = _meta((1, HEADS, LENGTH, slots), torch.float32)
        pairs, tiles = _meta((sel_heads * LENGTH * slots,), torch.int32), _meta((HEADS * LENGTH, 3), torch.int32)
        for bm_block in dict.fromkeys((block_size, 512)):
            options = bm.tiles_for(q.device, torch_dtype, head_dim, bm_block, HEADS // sel_heads)
            _, bm_fwd = bm.block_major_launch(q, k, k, index, q_pos, pairs, tiles, o_part, lse_part, bm_block,
                                              head_dim ** -0.5, options)
            configs.append(Config("selected_attention_block_major_fwd", case.replace(f"block {block_size}",
                                  f"block {bm_block}"), dtype, head_dim, bm.block_major_fwd_kernel, bm_fwd,
                                  tensor_cores))
            dq_options = bm.tiles_for(q.device, torch_dtype, head_dim, bm_block, HEADS // sel_heads,
                                      table=bm.DQ_LAUNCH_TABLE)
            _, bm_dq = bm.block_major_dq_launch(q, k, k, q, lse, lse, index, q_pos, pairs, tiles, o_part, bm_block,
                                                head_dim ** -0.5, dq_options)
            configs.append(Config("selected_attention_block_major_bwd_dq", case.replace(f"block {block_size}",
                                  f"block {bm_block}"), dtype, head_dim, bm.block_major_bwd_dq_kernel, bm_dq,
                                  tensor_cores))
        configs.append(Config("selected_attention_block_major_merge", case, dtype, head_dim, bm.merge_partials_kernel,
                              bm.merge_launch(o_part, lse_part, q, lse)[1], False))
    return configs


OPS = ("attention", "linear_attention", "cross_entropy", "rope", "selected_attention")


def default_subset(target: Target) -> list[Config]:
    """A representative subset: bf16 plain causal forward (with the tuner's other shapes) and backward at head dims
    128 and 256 (whose backward needed a smaller pipeline to fit), decode, the dk/dv kernel with every modifier at
    head dim 256 (the most shared memory), DCA's forward and backward (three segments: the most of any method),
    linear attention's chunk kernels, and selected-block attention's forward and backward kernels at head dim 128
    (both selection layouts)."""
    configs = []
    for head_dim in (128, 256):
        configs += attention_configs("bf16", head_dim, target, ["causal"], ("forward", "backward_dq", "backward_dk_dv"))
    configs += attention_configs("bf16", 128, target, ["causal"], ("decode",))
    # The largest shared memory of any configuration: every modifier at once (log-n scales query tiles in dk/dv).
    configs += attention_configs("bf16", 256, target, ["all modifiers"], ("backward_dk_dv",))
    configs += attention_configs("bf16", 128, target, ["dca (3 segments)"],
                                 ("forward", "backward_dq", "backward_dk_dv"))
    configs += linear_attention_configs("bf16", 128)
    configs += selected_attention_configs("bf16", 128)
    return configs


def all_configs(target: Target, dtypes: Iterable[str] = tuple(DTYPES), head_dims: Iterable[int] = HEAD_DIMS,
                ops: Iterable[str] = OPS, cases: Iterable[str] | None = None,
                kernels: Iterable[str] = ATTENTION_KERNELS) -> list[Config]:
    """Every configuration of the chosen ops, dtypes and head dims (attention: of ``cases``, default all, and
    ``kernels``)."""
    ops = set(ops)
    configs = []
    for dtype in dtypes:
        for head_dim in head_dims:
            if "attention" in ops:
                configs += attention_configs(dtype, head_dim, target, cases, kernels)
                if cases is None or "causal" in cases:
                    configs += attention_helper_configs(dtype, head_dim)
            if "linear_attention" in ops:
                configs += linear_attention_configs(dtype, head_dim)
            if "rope" in ops:
                configs += rope_configs(dtype, head_dim)
            if "selected_attention" in ops:
                configs += selected_attention_configs(dtype, head_dim)
        if "cross_entropy" in ops:
            configs += cross_entropy_configs(dtype)
    return configs



TRITON_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                      torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1",
                      torch.uint8: "u8"}


def tool(name: str) -> str | None:
    """Path of one of the NVIDIA tools Triton bundles (``cuobjdump``, ``ptxas``), or None when absent."""
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.access(path, os.X_OK) else None


def ptxas_path(arch: int) -> str | None:
    """The ptxas Triton itself compiles with for ``arch`` (newer PTX than the plain bundled ``ptxas`` reads)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):  # older Triton: no per-arch choice
        return tool("ptxas")


def source_of(config: Config):
    """``(ASTSource, options)``: the signature Triton's launcher would specialise the arguments to (pointers
    16-byte aligned, integers divisible by 16 marked so, integers equal to 1 folded as constants)."""
    from triton.compiler import ASTSource

    fn = config.fn
    kwargs = dict(config.kwargs)
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        name = param.name
        value = kwargs[name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_DTYPE_NAMES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and index not in fn.do_not_specialize:
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{config.key}: argument {name} = {value!r} has no Triton type")
    return ASTSource(fn, signature, constexprs, attrs), options


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def blocks_per_sm(registers: int, shared: int, num_warps: int, target: Target) -> int:
    """Resident blocks per SM allowed by registers (256-register units per warp), shared memory (1 KB reserved per
    block), threads and the block limit; 0 if one block does not fit."""
    if shared > target.shared_per_block:
        return 0
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = (target.regs_per_sm // regs_per_warp) // num_warps
    by_shared = target.shared_per_sm // (shared + 1024)
    by_threads = target.threads_per_sm // (32 * num_warps)
    return min(by_regs, by_shared, by_threads, target.blocks_per_sm)


def inspect_config(config: Config, target: Target) -> Row:
    """Compile ``config`` for ``target`` and read its figures; a compile failure is recorded in ``error``."""
    import triton
    from triton.backends.compiler import GPUTarget

    if config.refused:
        return Row(config.kernel, config.case, config.dtype, config.head_dim, target.name,
                   shared_limit=target.shared_per_block, tensor_cores_expected=config.tensor_cores,
                   refused=config.refused)
    src, options = source_of(config)
    consts = config.kwargs
    constexprs = {p.name for p in config.fn.params if p.is_constexpr}
    tiles = "x".join(str(consts[k]) for k in ("BLOCK_M", "BLOCK_N", "C", "BK", "BV", "BLOCK_V", "BLOCK_C",
                                              "BLOCK_G", "BLOCK_R", "BS")
                     if k in constexprs)
    row = Row(config.kernel, config.case, config.dtype, config.head_dim, target.name, tiles=tiles,
              num_warps=options["num_warps"], num_stages=options["num_stages"], shared_limit=target.shared_per_block,
              tensor_cores_expected=config.tensor_cores)
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", target.arch, 32), options=options)
    except Exception as e:  # noqa: BLE001 - a configuration that does not compile is a finding, not a crash
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        row.problems = check_row(row)
        return row
    row.shared_bytes = int(kernel.metadata.shared)
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = os.path.join(tmp, "k.cubin"), os.path.join(tmp, "k.ptx")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        cuobjdump = tool("cuobjdump")
        usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
        arch = f"sm_{target.arch}a" if target.arch >= 90 else f"sm_{target.arch}"
        log = subprocess.run([ptxas_path(target.arch), "-v", f"--gpu-name={arch}", ptx, "-o",
                              os.path.join(tmp, "v.o")], capture_output=True, text=True, check=True).stderr
    match = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if match:
        row.registers, row.stack_bytes = int(match.group(1)), int(match.group(2))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if spill:
        row.spill_stores, row.spill_loads = int(spill.group(1)), int(spill.group(2))
    row.hgmma = _count(r"\bHGMMA\.", sass)
    row.hmma = _count(r"\bHMMA\.", sass)
    row.mufu_ex2 = _count(r"MUFU\.EX2", sass)
    row.mufu_sincos = _count(r"MUFU\.(?:SIN|COS)\b", sass)
    ttgir = kernel.asm.get("ttgir", "")
    row.sincos_ops = _count(r"math\.(?:sin|cos) ", ttgir)
    row.precise_trig = row.sincos_ops > 0 and "sin.approx" not in kernel.asm["ptx"]
    row.blocks_per_sm = blocks_per_sm(row.registers, row.shared_bytes, row.num_warps, target)
    row.problems = check_row(row)
    return row


#: The Triton release the known lists below were recorded with. Register allocation differs between releases (on
#: 2026-12-05, sm_90 bf16: Triton 3.6 spills 64 B in the dk/dv kernel at head dim 128 where 3.9 spills none; Triton
#: 3.3 spills 200 B there and cannot compile the segment kernels at all), so the lists hold for this release only.
RECORDED_WITH = "3.9"

#: bf16/fp16 configurations allowed to spill (``target/kernel/case/dtype/d``). Empty since issue #14: the segment
#: kernels lost their in-loop sine and cosine (queries and keys rotate before the kernels), and tiles, warps and the
#: split dk/dv launch at head dim 256 were chosen until no configuration lce launches on sm_90 spills
#: (``experiments/results/kernels/compile/README.md``). The tests allow exactly these, so a spill cannot creep in.
KNOWN_SPILLS: frozenset[str] = frozenset()
#: The target the spill rule is held on (lce is benchmarked on an H200); elsewhere spills are reported, not enforced.
SPILL_TARGET = "sm_90"


def known_problem(row: Row) -> bool:
    """Whether every problem of ``row`` is a recorded spill (``KNOWN_SPILLS``; any spill off ``SPILL_TARGET``)."""
    recorded = row.target != SPILL_TARGET or f"{row.target}/{row.key}" in KNOWN_SPILLS
    return bool(row.problems) and recorded and all(p.startswith("spills") for p in row.problems)


def check_row(row: Row) -> list[str]:
    """What a GPU would reject or run badly in this configuration (empty when it is fine)."""
    problems = []
    if row.error:
        problems.append(f"does not compile: {row.error}")
        return problems
    if row.shared_bytes > row.shared_limit:
        problems.append(f"shared memory {row.shared_bytes:,} B > {row.shared_limit:,} B per block")
    half = row.dtype in ("bf16", "fp16")
    if half and row.spill_stores > 0:
        problems.append(f"spills {row.spill_stores} B")
    if half and row.tensor_cores_expected and row.hgmma + row.hmma == 0:
        problems.append("no tensor-core instruction")
    return problems


_FORKED: tuple[list[Config], Target] | None = None  # what forked workers compile (jit functions do not pickle)


def rows_in_subprocess(*args: str, timeout: float = 600) -> list[Row]:
    """Run ``python -m lce.kernels.inspect --json *args`` in a fresh process without ``TRITON_INTERPRET`` (the tests
    run under the interpreter, whose kernels cannot be compiled) and return its rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "lce.kernels.inspect", "--json", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"lce.kernels.inspect failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return [Row(**json.loads(line)) for line in done.stdout.splitlines() if line.startswith("{")]


def _inspect_index(index: int) -> Row:
    configs, target = _FORKED
    return inspect_config(configs[index], target)


def iter_rows(configs: list[Config], target: Target, jobs: int = 1) -> Iterator[Row]:
    """Rows for ``configs`` in order, as they are compiled (``jobs`` forked processes compile in parallel)."""
    global _FORKED
    if jobs <= 1:
        for config in configs:
            yield inspect_config(config, target)
        return
    _FORKED = (configs, target)
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            yield from pool.map(_inspect_index, range(len(configs)))
    finally:
        _FORKED = None


def inspect_all(configs: list[Config], target: Target, jobs: int = 1) -> list[Row]:
    """Rows for ``configs`` in order."""
    return list(iter_rows(configs, target, jobs))



COLUMNS = [f.name for f in dataclasses.fields(Row)]
SOURCE = "static (compiled, not measured on a GPU)"


def csv_values(row: Row) -> list:
    values = dataclasses.asdict(row)
    values["problems"] = "; ".join(row.problems)
    return [*(values[c] for c in COLUMNS), SOURCE]


def write_csv(rows: list[Row], path: str) -> None:
    """Long format: one row per configuration and target, every figure static."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*COLUMNS, "source"])
        writer.writerows(csv_values(row) for row in rows)


def _known_label(row: Row) -> str:
    if not known_problem(row):
        return ""
    return " (recorded)" if row.target == SPILL_TARGET else f" (not enforced off {SPILL_TARGET})"


def markdown(rows: list[Row]) -> str:
    """The table as markdown (static figures: compiled, not measured on a GPU)."""
    head = ("| kernel | case | dtype | d | target | tiles | warps | stages | regs | spill B (st/ld) | shared B | "
            "HGMMA | HMMA | MUFU.EX2 | sin/cos | blocks/SM | problems |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.refused:
            lines.append(f"| {r.kernel} | {r.case} | {r.dtype} | {r.head_dim} | {r.target} | | | | | | | | | | | | "
                         "refused by lce (LceError), not launched |")
            continue
        trig = "-" if not r.sincos_ops else (f"{r.sincos_ops} precise" if r.precise_trig else f"{r.mufu_sincos} MUFU")
        lines.append(f"| {r.kernel} | {r.case} | {r.dtype} | {r.head_dim} | {r.target} | {r.tiles} | {r.num_warps} | "
                     f"{r.num_stages} | {r.registers} | {r.spill_stores}/{r.spill_loads} | {r.shared_bytes:,} | "
                     f"{r.hgmma} | {r.hmma} | {r.mufu_ex2} | {trig} | {r.blocks_per_sm} | "
                     f"{'; '.join(r.problems) or 'ok'}{_known_label(r)} |")
    return "\n".join(lines) + "\n"


def versions() -> str:
    import triton

    return f"Triton {triton.__version__}, torch {torch.__version__}, Python {sys.version.split()[0]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lce.kernels.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=[80, 86, 90],
                        help="targets: 90 (H100/H200, default), 80 (A100), 86 (the 99 KB class)")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--head-dim", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--cases", nargs="+",
                        help="attention cases to keep (default: all), e.g. causal 'dca (3 segments)'")
    parser.add_argument("--kernels", nargs="+", default=list(ATTENTION_KERNELS), choices=list(ATTENTION_KERNELS),
                        help="attention kernels to keep (default: all)")
    parser.add_argument("--out", help="directory for compile.csv and compile.md (printed only when absent)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    parser.add_argument("--subset", action="store_true", help="only the representative subset (default_subset)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row instead of the table")
    args = parser.parse_args(argv)
    # Kernels defined under Triton's interpreter cannot be compiled: the check needs real @triton.jit functions.
    os.environ.pop("TRITON_INTERPRET", None)
    if tool("cuobjdump") is None:
        print("Triton with its bundled NVIDIA tools (triton/backends/nvidia/bin/cuobjdump) is needed", file=sys.stderr)
        return 2
    rows = []
    with contextlib.ExitStack() as stack:
        writer = None
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            writer = csv.writer(stack.enter_context(open(os.path.join(args.out, "compile.csv"), "w", newline="")))
            writer.writerow([*COLUMNS, "source"])
        for arch in args.arch:
            target = TARGETS[f"sm_{arch}"]
            if args.subset:
                configs = default_subset(target)
            else:
                configs = all_configs(target, args.dtype, args.head_dim, args.ops, args.cases, args.kernels)
            for row in iter_rows(configs, target, args.jobs):
                rows.append(row)
                print(json.dumps(dataclasses.asdict(row)) if args.json else markdown([row]).splitlines()[-1],
                      flush=True)
                if writer is not None:
                    writer.writerow(csv_values(row))
    if args.json:
        return 0
    table = markdown(rows)
    note = f"Static figures: compiled with {versions()} on {datetime.date.today().isoformat()}, not measured on a GPU."
    print(f"\n{note}\n\n{table}")
    if args.out:
        with open(os.path.join(args.out, "compile.md"), "w") as f:
            f.write(f"{note}\n\n{table}")
    bad = [r for r in rows if r.problems and not known_problem(r)]
    print(f"{len(rows)} configurations, {sum(bool(r.problems) for r in rows)} with problems, {len(bad)} of them not "
          "in the known list", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
