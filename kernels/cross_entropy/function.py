"""The fused linear cross-entropy as an autograd function, and the public ``linear_cross_entropy``.

``linear_cross_entropy(hidden, head, targets)`` checks its inputs, applies autocast's cast (a custom kernel is not
autocast by torch), and runs the reference (``reference.py``: chunked logits) or the Triton kernels
(``triton_linear_cross_entropy.py``: logits never in memory) as ``lce.kernels.backend.resolve_backend`` decides.
"""

from __future__ import annotations

import torch

from lce.errors import LceError
from lce.kernels.backend import resolve_backend
from lce.kernels.cross_entropy.head import LogitHead
from lce.kernels.cross_entropy.reference import IGNORE_INDEX, linear_cross_entropy_ref

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: ``(BLOCK_N, BLOCK_V, BLOCK_C)``: rows, vocabulary columns and hidden features per tile. Not tuned on a GPU yet.
DEFAULT_BLOCKS = (64, 128, 64)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``nll [N] = LCE(hidden [N, C], weight [V, C], bias [V] | None)``; keeps only ``lse [N]`` for the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, multiplier, softcap, blocks):
        from lce.kernels.cross_entropy.triton_linear_cross_entropy import lce_fwd

        nll, lse = lce_fwd(hidden, weight, bias, targets, multiplier, softcap, blocks)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.multiplier, ctx.softcap, ctx.blocks = multiplier, softcap, blocks
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        from lce.kernels.cross_entropy.triton_linear_cross_entropy import lce_bwd

        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        dh, dw, db = lce_bwd(hidden, weight, bias, targets, lse, grad_nll.float().contiguous(), ctx.multiplier,
                             ctx.softcap, ctx.blocks, need_dh, need_dw or need_db)
        return dh, dw if need_dw else None, db if need_db else None, None, None, None, None


def check_blocks(blocks: tuple[int, int, int]) -> tuple[int, int, int]:
    """``blocks`` if each is a power of two >= 16 (the smallest ``tl.dot`` operand), else an ``LceError``."""
    if len(blocks) != 3 or any(b < 16 or b & (b - 1) for b in blocks):
        raise LceError(f"blocks (BLOCK_N, BLOCK_V, BLOCK_C) must be three powers of two >= 16, got {blocks}")
    return tuple(blocks)


def linear_cross_entropy_triton(
    hidden: torch.Tensor, head: LogitHead, targets: torch.Tensor, blocks: tuple[int, int, int] = DEFAULT_BLOCKS
) -> torch.Tensor:
    """The Triton path of ``linear_cross_entropy`` on checked inputs, with explicit tile sizes."""
    bias = None if head.bias is None else head.bias.contiguous()
    return LinearCrossEntropyFunction.apply(hidden.contiguous(), head.weight.contiguous(), bias, targets.contiguous(),
                                            head.multiplier, head.softcap, check_blocks(blocks))


def check_head(head: LogitHead) -> None:
    if not isinstance(head, LogitHead):
        raise LceError(f"head must be a lce.kernels.cross_entropy.LogitHead, got {type(head).__name__}")


def check_inputs(hidden: torch.Tensor, head: LogitHead, targets: torch.Tensor) -> None:
    """Raise ``LceError`` naming the bad value unless ``hidden [N, C]``, ``head`` and ``targets [N]`` fit together:
    one floating dtype in ``DTYPES``, one device, targets in ``[0, V)`` or ``-100``."""
    check_head(head)
    if hidden.dim() != 2 or hidden.shape[1] != head.hidden_size:
        raise LceError(f"hidden must be [N, C] with C = {head.hidden_size} (the head's weight is "
                       f"{list(head.weight.shape)}), got {list(hidden.shape)}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise LceError(f"targets must be [N] = [{hidden.shape[0]}] like hidden's rows, got {list(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise LceError(f"targets must hold integer token ids, got {targets.dtype}")
    tensors = {"hidden": hidden, "head.weight": head.weight, "head.bias": head.bias}
    for name, tensor in tensors.items():
        if tensor is not None and tensor.dtype not in DTYPES:
            raise LceError(f"{name} has dtype {tensor.dtype}; allowed: {', '.join(map(str, DTYPES))}")
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        raise LceError(f"hidden and the head must share one dtype (outside autocast), got {dtypes}")
    devices = {name: t.device for name, t in {**tensors, "targets": targets}.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise LceError(f"hidden, head and targets must be on one device, got {devices}")
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= head.vocab_size))
    if bad.any():
        index = int(bad.nonzero()[0, 0])
        raise LceError(f"targets[{index}] = {int(targets[index])} is not a token id: allowed are 0..."
                       f"{head.vocab_size - 1} (the head's vocabulary) and {IGNORE_INDEX} (not scored)")


def linear_cross_entropy(
    hidden: torch.Tensor,
    head: LogitHead,
    targets: torch.Tensor,
    backend: str | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Per-token NLL in nats of ``targets`` under the logits ``head(hidden)``, without ``N x V`` logits in memory.

    Workspace beyond the inputs and the gradients' own sizes: Triton O(N + one tile per program) (``lse [N]`` is all
    that the backward keeps), the reference O(chunk_size x V).

    Args:
        hidden: ``[N, C]`` hidden states (fp32, bf16 or fp16; under autocast, cast to autocast's dtype).
        head: the logit head (``[V, C]`` weight, ``[V]`` bias or None, multiplier, soft-cap).
        targets: ``[N]`` token ids in ``[0, V)``; ``-100`` marks positions that are not scored (NLL 0, no gradient).
        backend: ``ref``, ``triton`` or ``auto``/None (see ``lce.kernels.backend``).
        chunk_size: rows of logits alive at once on the reference path (the Triton path works in tiles).

    Returns:
        ``[N]`` float32 NLL per position, differentiable with respect to ``hidden``, ``head.weight`` and
        ``head.bias``.

    Raises:
        LceError: mismatched shapes, dtypes or devices, targets outside the vocabulary, ``chunk_size < 1``.
    """
    if chunk_size < 1:
        raise LceError(f"chunk_size must be at least 1, got {chunk_size}")
    check_head(head)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, head = hidden.to(dtype), head.to(dtype)
    check_inputs(hidden, head, targets)
    if resolve_backend(backend, hidden, head.weight, targets) == "ref":
        return linear_cross_entropy_ref(hidden, head, targets, chunk_size)
    return linear_cross_entropy_triton(hidden, head, targets)
