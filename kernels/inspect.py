"""Compile every Triton kernel configuration lce launches for a GPU target, without a GPU, and read what it costs.

``python -m lce.kernels.inspect`` compiles each configuration ahead of time (``triton.compile`` with
``GPUTarget("cuda", 90, 32)``; ``--arch 80`` for an A100) and reads the machine code with the ``cuobjdump`` and
``ptxas`` Triton bundles: registers per thread, spill bytes (``ptxas -v``), shared memory per block, tensor-core
instructions (``HGMMA`` = Hopper wgmma, ``HMMA`` = mma.sync), ``MUFU.EX2`` and sin/cos (fast ``MUFU.SIN/COS`` or
precise libdevice sequences), and the blocks per SM those allow. Every figure is static: compiled, not measured on a
GPU; instruction counts are for the whole kernel (the main loop is most of it, but not all).

The configurations come from the code that launches them: the attention kernels' arguments from
``triton_forward.forward_launch`` and ``triton_backward.backward_launches`` (on meta tensors, with specs built by the
position encodings' own segment builders), the tiles from ``attention.launch``, linear attention's and
cross-entropy's from the constants their launchers use. So a configuration checked here is one lce runs.

``check_row`` lists what a GPU would reject or run badly: shared memory over the per-block limit, register spills in
a bf16/fp16 kernel (beyond the recorded ``KNOWN_SPILL_CASES`` / ``KNOWN_SPILLS``), a bf16/fp16 matmul without a
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


def attention_configs(dtype: str, head_dim: int, target: Target, cases: Iterable[str] | None = None,
                      kernels: Iterable[str] = ATTENTION_KERNELS) -> list[Config]:
    """The attention launches for one dtype and head dim, as ``flash_attention`` would make them on ``target``."""
    from lce.kernels.attention.launch import tile_sizes
    from lce.kernels.attention.schedule import TileSchedule
    from lce.kernels.attention.triton_backward import (
        attention_bwd_dk_dv_kernel,
        attention_bwd_dq_kernel,
        backward_launches,
    )
    from lce.kernels.attention.triton_forward import attention_fwd_kernel, forward_launch

    torch_dtype = DTYPES[dtype]
    capability = (target.arch // 10, target.arch % 10)
    kernels = tuple(kernels)
    wanted = None if cases is None else set(cases)
    configs = []
    for case, spec in attention_cases(head_dim):
        if wanted is not None and case not in wanted:
            continue
        tensor_cores = torch_dtype != torch.float32
        for kernel in kernels:
            tq = 1 if kernel == "decode" else LENGTH
            block_m, block_n = tile_sizes(tq, torch.device("cuda"), torch_dtype, head_dim)
            n_qt, n_kt = -(-tq // block_m), -(-LENGTH // block_n)
            schedule = TileSchedule(block_m, block_n, _meta((1, n_qt), torch.int32),
                                    _meta((1, n_qt, n_kt), torch.int32), _meta((1, n_kt), torch.int32),
                                    _meta((1, n_kt, n_qt), torch.int32))
            q = _meta((1, HEADS, tq, head_dim), torch_dtype)
            k = v = _meta((1, KV_HEADS, LENGTH, head_dim), torch_dtype)
            q_pos, k_pos = _meta((1, tq), torch.int32), _meta((1, LENGTH), torch.int32)
            lse = _meta((1, HEADS, tq), torch.float32)
            try:
                if kernel in ("forward", "decode"):
                    n_splits = 8 if kernel == "decode" else 1
                    out = _meta((1, tq, HEADS, head_dim), torch_dtype if n_splits == 1 else torch.float32)
                    _, kwargs = forward_launch(q, k, v, out, lse, lse, lse, spec, q_pos, k_pos, schedule, n_splits,
                                               capability)
                    fn = attention_fwd_kernel
                else:
                    part = kernel.removeprefix("backward_")
                    launches = backward_launches(q, k, v, q, lse, lse, q, k, v, spec, q_pos, k_pos, schedule,
                                                 capability)
                    fn = attention_bwd_dq_kernel if part == "dq" else attention_bwd_dk_dv_kernel
                    kwargs = launches[part][1]
            except LceError as e:  # lce refuses this configuration on the target: nothing to compile
                configs.append(Config(f"attention_{kernel}", case, dtype, head_dim, None, {}, tensor_cores, str(e)))
                continue
            configs.append(Config(f"attention_{kernel}", case, dtype, head_dim, fn, kwargs, tensor_cores))
    return configs


def linear_attention_configs(dtype: str, features: int) -> list[Config]:
    """The chunked linear-attention kernels at ``F = E = features`` (plus the ones channel of the normaliser), chunk
    64, with decay: what ``linear_attention`` launches (``triton_chunk`` kernels). Their dots are fp32 "ieee" by
    design (inputs converted on load), so no tensor-core instruction is expected."""
    from lce.kernels.linear_attention import triton_chunk as tc
    from lce.kernels.linear_attention.function import MAX_TRITON_CHUNK, triton_chunk

    torch_dtype = DTYPES[dtype]
    chunk = triton_chunk(MAX_TRITON_CHUNK)
    channels = features + 1  # function.linear_attention appends a value channel of ones
    bk, bv = tc._tiles(features, channels)
    nt = LENGTH // chunk
    x, y = _meta((1, HEADS, LENGTH, features), torch_dtype), _meta((1, HEADS, LENGTH, channels), torch_dtype)
    b = _meta((1, HEADS, LENGTH), torch.float32)
    state = _meta((1, HEADS, nt, features, channels), torch.float32)
    final = _meta((1, HEADS, features, channels), torch.float32)
    grad = _meta((1, HEADS, LENGTH, features), torch.float32)
    sizes = dict(T=LENGTH, F=features, E=channels, NT=nt, C=chunk, BK=bk, BV=bv, USE_DECAY=True, **tc.LAUNCH_OPTIONS)
    launches = [
        ("chunk_state_fwd", tc.chunk_state_fwd_kernel,
         {"k_ptr": x, "v_ptr": y, "b_ptr": b, "h0_ptr": final, "h_ptr": state, "ht_ptr": final,
          "HAS_INITIAL": True, "STORE_STATES": True}),
        ("chunk_output_fwd", tc.chunk_output_fwd_kernel,
         {"q_ptr": x, "k_ptr": x, "v_ptr": y, "b_ptr": b, "h_ptr": state, "o_ptr": y}),
        ("chunk_state_bwd", tc.chunk_state_bwd_kernel,
         {"q_ptr": x, "do_ptr": y, "b_ptr": b, "dht_ptr": final, "dh_ptr": state, "dh0_ptr": final}),
        ("chunk_dv_bwd", tc.chunk_dv_bwd_kernel,
         {"q_ptr": x, "k_ptr": x, "b_ptr": b, "do_ptr": y, "dh_ptr": state, "dv_ptr": grad}),
        ("chunk_dqk_bwd", tc.chunk_dqk_bwd_kernel,
         {"q_ptr": x, "k_ptr": x, "v_ptr": y, "b_ptr": b, "h_ptr": state, "do_ptr": y, "dh_ptr": state,
          "dq_ptr": grad, "dk_ptr": grad}),
    ]
    return [Config(f"linear_attention_{name}", f"decay, chunk {chunk}", dtype, features, fn, dict(args, **sizes),
                   tensor_cores=False) for name, fn, args in launches]


def cross_entropy_configs(dtype: str, hidden_size: int = 4096, vocab: int = 128_256) -> list[Config]:
    """The fused linear cross-entropy kernels with ``DEFAULT_BLOCKS``, no bias, no soft-cap (a Llama head)."""
    from lce.kernels.cross_entropy import triton_linear_cross_entropy as ce
    from lce.kernels.cross_entropy.function import DEFAULT_BLOCKS

    torch_dtype = DTYPES[dtype]
    n = LENGTH
    h, w = _meta((n, hidden_size), torch_dtype), _meta((vocab, hidden_size), torch_dtype)
    targets, vec = _meta((n,), torch.int64), _meta((n,), torch.float32)
    meta = ce._meta(h, None, None, DEFAULT_BLOCKS)
    common = dict(h_ptr=h, w_ptr=w, b_ptr=h, targets_ptr=targets, N=n, V=vocab, C=hidden_size, multiplier=1.0,
                  softcap=1.0, ignore_index=-100, **meta)
    tensor_cores = torch_dtype != torch.float32
    blocks = "x".join(map(str, DEFAULT_BLOCKS))
    return [
        Config("cross_entropy_fwd", f"blocks {blocks}", dtype, hidden_size, ce.lce_fwd_kernel,
               dict(common, nll_ptr=vec, lse_ptr=vec), tensor_cores),
        Config("cross_entropy_bwd_dh", f"blocks {blocks}", dtype, hidden_size, ce.lce_bwd_dh_kernel,
               dict(common, lse_ptr=vec, grad_ptr=vec, dh_ptr=_meta((n, hidden_size), torch.float32)), tensor_cores),
        Config("cross_entropy_bwd_dw", f"blocks {blocks}", dtype, hidden_size, ce.lce_bwd_dw_kernel,
               dict(common, lse_ptr=vec, grad_ptr=vec, dw_ptr=_meta((vocab, hidden_size), torch.float32), db_ptr=vec),
               tensor_cores),
    ]


def rope_configs(dtype: str, head_dim: int) -> list[Config]:
    """The fused RoPE kernel (queries and keys of one row per program), full rotary, half style."""
    from lce.kernels.rope import triton_rope as tr

    torch_dtype = DTYPES[dtype]
    q = _meta((1, HEADS, LENGTH, head_dim), torch_dtype)
    k = _meta((1, KV_HEADS, LENGTH, head_dim), torch_dtype)
    pos, inv_freq = _meta((1, LENGTH), torch.int64), _meta((head_dim // 2,), torch.float32)
    kwargs = tr.rope_launch(q, k, q, k, pos, inv_freq, 1.0, "half", False)[1]
    return [Config("rope_fwd", "q and k, half style", dtype, head_dim, tr.rope_fwd_kernel, kwargs, False)]


OPS = ("attention", "linear_attention", "cross_entropy", "rope")


def default_subset(target: Target) -> list[Config]:
    """A representative subset that compiles in well under a minute: bf16 plain causal forward and backward at head
    dims 128 and 256 (whose backward needed a smaller pipeline to fit), decode, the dk/dv kernel with every modifier
    at head dim 256 (the most shared memory), and one segment forward (segment kernels take 10-60 s each to compile:
    their sin/cos are unrolled per segment)."""
    configs = []
    for head_dim in (128, 256):
        configs += attention_configs("bf16", head_dim, target, ["causal"], ("forward", "backward_dq", "backward_dk_dv"))
    configs += attention_configs("bf16", 128, target, ["causal"], ("decode",))
    # The largest shared memory of any configuration: every modifier at once (log-n scales query tiles in dk/dv).
    configs += attention_configs("bf16", 256, target, ["all modifiers"], ("backward_dk_dv",))
    configs += attention_configs("bf16", 64, target, ["rope in kernel (1 segment)"], ("forward",))
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
            if "linear_attention" in ops:
                configs += linear_attention_configs(dtype, head_dim)
            if "rope" in ops:
                configs += rope_configs(dtype, head_dim)
        if "cross_entropy" in ops:
            configs += cross_entropy_configs(dtype)
    return configs



TRITON_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                      torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1", torch.uint8: "u8"}


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
    tiles = "x".join(str(consts[k]) for k in ("BLOCK_M", "BLOCK_N", "C", "BK", "BV", "BLOCK_V", "BLOCK_C")
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

#: Attention cases whose bf16/fp16 kernels spill registers today, all head dims and kernels: the segment kernels
#: rotate q and k with precise sin/cos inside the key loop (issue #14 item 3 moves the rotation out of the loop).
KNOWN_SPILL_CASES = frozenset({"rope in kernel (1 segment)", "self_extend (2 segments)", "rerope (2 segments)",
                               "sinks (2 segments + window)", "dca (3 segments)"})

#: Every other bf16/fp16 configuration known to spill (``target/kernel/case/dtype/d``), as the compile check recorded
#: it on 2026-12-05 (``experiments/results/kernels/compile/README.md``): the dk/dv kernel at head dim 256 (four fp32
#: accumulators of 64 x 256) and, by a few bytes, with log-n or a block mask (issue #14 item 4); head dim 256 with
#: log-n or a block mask; linear attention's chunk kernels, which compute in fp32 (item 6); the cross-entropy dW
#: kernel (item 7). The tests allow exactly these, so the list cannot grow unnoticed.
KNOWN_SPILLS: frozenset[str] = frozenset(
    [f"sm_90/attention_{kernel}/{case}/{dtype}/d{d}" for dtype in ("bf16", "fp16") for kernel, case, d in (
        ("backward_dk_dv", "causal", 256), ("backward_dk_dv", "alibi", 256), ("backward_dk_dv", "window+sinks", 256),
        ("backward_dk_dv", "logn", 128), ("backward_dk_dv", "logn", 256), ("backward_dk_dv", "block_mask", 128),
        ("backward_dk_dv", "block_mask", 256), ("backward_dq", "logn", 256), ("forward", "logn", 256),
        ("forward", "block_mask", 256), ("decode", "block_mask", 64),
        ("forward", "all modifiers", 128), ("backward_dq", "all modifiers", 128),
        ("backward_dk_dv", "all modifiers", 128), ("forward", "all modifiers", 256),
        ("backward_dq", "all modifiers", 256), ("backward_dk_dv", "all modifiers", 256))]
    + [f"sm_90/linear_attention_{kernel}/decay, chunk 64/{dtype}/d{d}" for dtype in ("bf16", "fp16")
       for d in HEAD_DIMS for kernel in ("chunk_output_fwd", "chunk_state_bwd", "chunk_dv_bwd", "chunk_dqk_bwd")]
    + [f"sm_90/cross_entropy_bwd_dw/blocks 64x128x64/{dtype}/d4096" for dtype in ("bf16", "fp16")]
)
#: The target the spill rule is held on (lce is benchmarked on an H200); elsewhere spills are reported, not enforced.
SPILL_TARGET = "sm_90"


def known_problem(row: Row) -> bool:
    """Whether every problem of ``row`` is a recorded spill (``KNOWN_SPILL_CASES``, ``KNOWN_SPILLS``; any spill off
    ``SPILL_TARGET``)."""
    recorded = (row.target != SPILL_TARGET or (row.kernel.startswith("attention_") and row.case in KNOWN_SPILL_CASES)
                or f"{row.target}/{row.key}" in KNOWN_SPILLS)
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
