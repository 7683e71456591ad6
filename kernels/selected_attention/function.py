"""The public selected-block attention op: checks its inputs, drops repeated blocks, resolves the backend, runs one
of the two PyTorch forms (``ref``; ``pytorch_form`` picks the faster) or one of the two Triton forwards (``triton``;
``triton_form`` picks: ``triton_selected``'s per-token forward and dq kernels, or ``triton_block_major``'s
key-block-major forward and dq kernels; both with ``triton_selected``'s dk/dv kernel per key block)."""

from __future__ import annotations

import torch

from lce.errors import LceError
from lce.kernels.backend import requested_backend, resolve_backend
from lce.kernels.selected_attention.reference import (
    drop_repeated_blocks,
    selected_attention_chunked,
    selected_attention_masked,
)


def check_inputs(q, k, v, block_index, block_size: int, q_pos) -> None:
    """A one-line ``LceError`` for shapes the op does not take."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise LceError(f"selected_attention: q must be [B, HQ, Tq, D] and k, v equal [B, HKV, Tk, D] (one D); got q "
                       f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch, heads, tq, _ = q.shape
    if k.shape[0] != batch or heads % k.shape[1]:
        raise LceError(f"selected_attention: k has {k.shape[1]} heads for {heads} query heads (must divide) or another "
                       f"batch ({k.shape[0]} vs {batch})")
    if block_index.dim() != 4 or block_index.shape[0] != batch or block_index.shape[2] != tq \
            or block_index.shape[1] not in (heads, k.shape[1]):
        raise LceError(f"selected_attention: block_index must be [B, HQ or HKV, Tq, N] = [{batch}, {heads} or "
                       f"{k.shape[1]}, {tq}, N], got {tuple(block_index.shape)}")
    if block_index.dtype not in (torch.int32, torch.int64):
        raise LceError(f"selected_attention: block_index must be int32 or int64, got {block_index.dtype}")
    if block_size < 1:
        raise LceError(f"selected_attention: block_size must be >= 1, got {block_size}")
    if q_pos is not None and tuple(q_pos.shape) != (batch, tq):
        raise LceError(f"selected_attention: q_pos must be [B, Tq] = [{batch}, {tq}], got {tuple(q_pos.shape)}")


#: What each PyTorch form costs per unit of work on a CPU, in nanoseconds: the masked form per (query head, causal
#: key) it scores in SDPA; the key-block-major form per (query head, selected key) in its unfused passes, and per step
#: (one selected block of one selection head: a gather of the queries that chose it and a few small products).
#: Fitted to one thread of an Intel Xeon (AMX) VM, bf16, 9 query / 3 KV heads, head dim 64 (2026-12-05, the other
#: core busy; ``experiments/results/sparse_attention/cpu_bench_bf16/``, ``op_masked`` vs ``op_block_major``, and a
#: repeat of its 4k and 16k points): Quest's 16-key pages x 64: masked 0.58-0.79 s vs key-block-major 2.1-2.8 s at
#: 4k, 1.5 vs 3.0 s at 8k, a tie at 16k (11.0 vs 10.2 s; 15.0 vs 19.1 s in the repeat): the steps dominate, 1-2 ms
#: each; NSA's 64-key blocks x 16: 0.48-0.85 vs 0.36-0.63 s at 4k, 9.5-11.5 vs 2.1-5.2 s at 16k; MoBA's 512-key
#: blocks x 3: 0.51-0.99 vs 0.30-0.76 s at 4k, 10.3-10.5 vs 2.6-3.6 s at 16k. Decoding (one query) picks the masked
#: form: a step costs more than scoring 16k keys.
MASKED_NS_PER_KEY = 12.0
BLOCK_MAJOR_NS_PER_KEY = 13.0
BLOCK_MAJOR_NS_PER_STEP = 2.0e6


def pytorch_form(block_index: torch.Tensor, block_size: int, num_keys: int, heads: int) -> str:
    """``"block_major"`` (``selected_attention_chunked``) or ``"masked"`` (``selected_attention_masked``): the form
    with the lower predicted time for ``heads`` query heads over ``num_keys`` keys (the ``*_NS_*`` costs)."""
    sel_heads, tq, slots = block_index.shape[1:]
    mean_causal_keys = max(1.0, num_keys - (tq - 1) / 2)  # the queries are the last tq of the keys
    masked = heads * tq * mean_causal_keys * MASKED_NS_PER_KEY
    steps = sel_heads * min(-(-num_keys // block_size), tq * slots)  # selected blocks per selection head
    block_major = (heads * tq * min(slots * block_size, mean_causal_keys) * BLOCK_MAJOR_NS_PER_KEY
                   + block_index.shape[0] * steps * BLOCK_MAJOR_NS_PER_STEP)
    return "block_major" if block_major < masked else "masked"


#: Fewest queries for which the key-block-major Triton forward runs with a selection per query head: below it a
#: block's list holds too few rows to fill a tile (decoding: one query), and the per-token kernel reads less.
BLOCK_MAJOR_MIN_QUERIES = 16


def triton_form(block_index: torch.Tensor, block_size: int, heads: int) -> str:
    """``"block_major"`` (``triton_block_major``) or ``"per_token"`` (``triton_selected``), by design, not yet by GPU
    timing (``experiments/benchmarks/selected_attention.py`` times both): the per-token kernel's query tile is the
    ``G = HQ / HS`` heads sharing a selection, padded to 16 rows, so with a selection per query head (``G = 1``: MoBA,
    Quest) it holds one useful row and reads every selected block for one query; the key-block-major forward fills
    its tiles with the queries that chose a block. Blocks over 128 keys only the key-block-major forward takes."""
    from lce.kernels.selected_attention.triton_selected import BLOCK_SIZES

    per_query_head = block_index.shape[1] == heads
    if block_size > max(BLOCK_SIZES) or (per_query_head and block_index.shape[2] >= BLOCK_MAJOR_MIN_QUERIES):
        return "block_major"
    return "per_token"


def run_pytorch_form(q, k, v, block_index, block_size: int, scale: float, q_pos):
    form = pytorch_form(block_index, block_size, k.shape[2], q.shape[1])
    run = selected_attention_chunked if form == "block_major" else selected_attention_masked
    return run(q, k, v, block_index, block_size, scale, q_pos)


def selected_attention(q, k, v, block_index, block_size: int, scale: float, q_pos=None, backend: str | None = None):
    """Causal attention of each query over its selected key blocks (``reference.selected_attention_reference`` says
    what is computed; arguments and result as there). Differentiable in ``q``, ``k``, ``v``; the selection is an
    integer input and has no gradient.

    Args:
        backend: ``ref`` (the PyTorch forms, ``pytorch_form`` picks), ``triton`` or ``auto``/None
            (``lce.kernels.backend``; ``triton_form`` picks the Triton forward); under ``auto`` on CUDA, sizes the
            Triton kernels do not take (block sizes that are not powers of two from 16 to 4096, float64, head dims
            over 256) run the PyTorch forms, under ``triton`` they are an error.
    """
    check_inputs(q, k, v, block_index, block_size, q_pos)
    block_index = drop_repeated_blocks(block_index)
    if q_pos is None:
        tq, tk = q.shape[2], k.shape[2]
        q_pos = torch.arange(tk - tq, tk, device=q.device)[None].expand(q.shape[0], tq)
    if resolve_backend(backend, q, k, v) == "triton":
        from lce.kernels.selected_attention import triton_block_major, triton_selected

        if triton_form(block_index, block_size, q.shape[1]) == "block_major":
            check, run = triton_block_major.check_block_major, triton_block_major.selected_attention_block_major
        else:
            check, run = triton_selected.check_supported, triton_selected.selected_attention_triton
        try:
            check(q, k, block_index, block_size)
        except LceError:
            if requested_backend(backend) == "triton":
                raise
            # ``auto`` (CUDA): a size the kernels do not take runs the PyTorch forms
            return run_pytorch_form(q, k, v, block_index, block_size, scale, q_pos)
        return run(q, k, v, block_index, block_size, scale, q_pos)
    return run_pytorch_form(q, k, v, block_index, block_size, scale, q_pos)
