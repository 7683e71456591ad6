"""The public selected-block attention op: checks its inputs, resolves the backend, runs one of the two PyTorch forms
(``ref``; ``pytorch_form`` picks) or the Triton kernels (``triton``, autograd through
``triton_selected.SelectedAttentionFunction``)."""

from __future__ import annotations

import torch

from lce.errors import LceError
from lce.kernels.backend import requested_backend, resolve_backend
from lce.kernels.selected_attention.reference import selected_attention_chunked, selected_attention_masked


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


#: The key-block-major form runs when blocks hold at least this many keys and the selection keeps at most
#: ``1 / SPARSE_ENOUGH`` of a query's causal keys on average; otherwise the masked form. Why: the masked form computes
#: every causal key in fused SDPA, the key-block-major form only the selected ones but in about six unfused
#: elementwise passes per selected key plus a Python step per (block, head). Measured on 2 CPU cores, bf16, 9 / 3
#: heads, d 64 (``experiments/benchmarks/sparse_cpu.py``, ``op_masked`` vs ``op_block_major`` in
#: ``experiments/results/sparse_attention/cpu_bench/``): 16-key blocks, 1024 keys selected: masked 40x faster at 4k;
#: 64- and 512-key blocks: masked faster at 4k, even at 16k, where the selection keeps 1/8-1/5 of the causal keys.
MIN_BLOCK_MAJOR_BLOCK = 64
SPARSE_ENOUGH = 8


def pytorch_form(block_index: torch.Tensor, block_size: int, num_keys: int) -> str:
    """``"block_major"`` (``selected_attention_chunked``) or ``"masked"`` (``selected_attention_masked``): the faster
    of the two PyTorch forms for this selection (``MIN_BLOCK_MAJOR_BLOCK`` and ``SPARSE_ENOUGH`` say why)."""
    tq = block_index.shape[2]
    selected = block_index.shape[-1] * block_size
    mean_causal_keys = num_keys - (tq - 1) / 2  # queries are the last tq of the keys, or fewer keys visible
    if block_size >= MIN_BLOCK_MAJOR_BLOCK and selected * SPARSE_ENOUGH <= mean_causal_keys:
        return "block_major"
    return "masked"


def run_pytorch_form(q, k, v, block_index, block_size: int, scale: float, q_pos):
    form = pytorch_form(block_index, block_size, k.shape[2])
    run = selected_attention_chunked if form == "block_major" else selected_attention_masked
    return run(q, k, v, block_index, block_size, scale, q_pos)


def selected_attention(q, k, v, block_index, block_size: int, scale: float, q_pos=None, backend: str | None = None):
    """Causal attention of each query over its selected key blocks (``reference.selected_attention_reference`` says
    what is computed; arguments and result as there). Differentiable in ``q``, ``k``, ``v``; the selection is an
    integer input and has no gradient.

    Args:
        backend: ``ref`` (the PyTorch forms, ``pytorch_form`` picks), ``triton`` or ``auto``/None
            (``lce.kernels.backend``); under ``auto`` on CUDA, sizes the Triton kernels do not take
            (``triton_selected.check_supported``: block sizes other than 16-128) run the PyTorch forms, under
            ``triton`` they are an error.
    """
    check_inputs(q, k, v, block_index, block_size, q_pos)
    if q_pos is None:
        tq, tk = q.shape[2], k.shape[2]
        q_pos = torch.arange(tk - tq, tk, device=q.device)[None].expand(q.shape[0], tq)
    if resolve_backend(backend, q, k, v) == "triton":
        from lce.kernels.selected_attention.triton_selected import check_supported, selected_attention_triton

        try:
            check_supported(q, k, block_index, block_size)
        except LceError:
            if requested_backend(backend) == "triton":
                raise
            # ``auto`` (CUDA): a size the kernels do not take (MoBA's 512-key blocks) runs the PyTorch form
            return run_pytorch_form(q, k, v, block_index, block_size, scale, q_pos)
        return selected_attention_triton(q, k, v, block_index, block_size, scale, q_pos)
    return run_pytorch_form(q, k, v, block_index, block_size, scale, q_pos)
