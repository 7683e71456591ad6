"""The fused linear cross-entropy as an autograd function, and the public ``linear_cross_entropy``.

``linear_cross_entropy(hidden, head, targets)`` checks its inputs, applies autocast's cast (a custom kernel is not
autocast by torch), and runs the reference (``reference.py``: chunked logits, recomputed in the backward) or the
Triton path (``triton_linear_cross_entropy.py``: chunked logits, gradients taken in the forward pass) as
``lce.kernels.backend.resolve_backend`` decides.
"""

from __future__ import annotations

import torch

from lce.errors import LceError
from lce.kernels.backend import resolve_backend
from lce.kernels.cross_entropy.head import LogitHead
from lce.kernels.cross_entropy.reference import IGNORE_INDEX, linear_cross_entropy_ref

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Rows of logits alive at once unless the caller says otherwise: 1 GiB of bf16 logits at a 128k vocabulary, and a
#: 4096-deep reduction for the weight's gradient matmul.
DEFAULT_CHUNK_SIZE = 4096


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``nll [N] = LCE(hidden [N, C], weight [V, C], bias [V] | None)``.

    The forward pass also computes the gradients of ``nll.sum()`` with respect to the inputs that require one and
    keeps them (``dh [N, C]`` in ``hidden``'s dtype, ``dw [V, C]`` and ``db [V]`` in fp32); the backward scales
    them by the upstream gradient, or recomputes ``dw``/``db`` when that gradient differs between scored rows (see
    ``triton_linear_cross_entropy``).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, multiplier, softcap, chunk_size, block_v):
        from lce.kernels.cross_entropy.triton_linear_cross_entropy import lce_chunked

        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        nll, dh, dw, db = lce_chunked(hidden, weight, bias, targets, multiplier, softcap, chunk_size, block_v,
                                      need_dh=need_dh, need_dw=need_dw, need_db=need_db)
        ctx.save_for_backward(hidden, weight, bias, targets, dh, dw, db)
        ctx.multiplier, ctx.softcap, ctx.chunk_size, ctx.block_v = multiplier, softcap, chunk_size, block_v
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        from lce.kernels.cross_entropy.triton_linear_cross_entropy import lce_chunked, uniform_value

        hidden, weight, bias, targets, dh, dw, db = ctx.saved_tensors
        grad = grad_nll.float()
        # torch.mul into a tensor of the gradient's dtype: the product is taken in fp32 and rounded once. New
        # tensors, never the saved ones in place, so a second backward (retain_graph) finds them intact.
        if dh is not None:
            dh = torch.mul(dh, grad[:, None], out=torch.empty_like(hidden))
        if dw is not None or db is not None:
            scale = uniform_value(grad, targets)
            if scale is None:
                _, _, dw, db = lce_chunked(hidden, weight, bias, targets, ctx.multiplier, ctx.softcap,
                                           ctx.chunk_size, ctx.block_v, need_dw=dw is not None,
                                           need_db=db is not None, row_scale=grad.contiguous())
                scale = 1.0
            if dw is not None:
                dw = torch.mul(dw, scale, out=torch.empty_like(weight))
            if db is not None:
                db = torch.mul(db, scale, out=torch.empty_like(bias))
        return dh, dw, db, None, None, None, None, None


def check_block_v(block_v: int) -> int:
    """``block_v`` if it is a power of two >= 16, else an ``LceError``."""
    if block_v < 16 or block_v & (block_v - 1):
        raise LceError(f"block_v (vocabulary columns per slice) must be a power of two >= 16, got {block_v}")
    return block_v


def linear_cross_entropy_triton(hidden: torch.Tensor, head: LogitHead, targets: torch.Tensor,
                                chunk_size: int = DEFAULT_CHUNK_SIZE, block_v: int | None = None) -> torch.Tensor:
    """The Triton path of ``linear_cross_entropy`` on checked inputs; ``block_v`` (vocabulary columns per slice of a
    row in the kernel) defaults to ``triton_linear_cross_entropy.BLOCK_V``. Takes no gradient when autograd is off
    or nothing requires one."""
    from lce.kernels.cross_entropy import triton_linear_cross_entropy as ce

    if chunk_size < 1:
        raise LceError(f"chunk_size must be at least 1, got {chunk_size}")
    block_v = check_block_v(ce.BLOCK_V if block_v is None else block_v)
    bias = None if head.bias is None else head.bias.contiguous()
    args = (hidden.contiguous(), head.weight.contiguous(), bias, targets.contiguous(), head.multiplier, head.softcap,
            chunk_size, block_v)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:3]):
        return LinearCrossEntropyFunction.apply(*args)
    return ce.lce_chunked(*args)[0]


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
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Per-token NLL in nats of ``targets`` under the logits ``head(hidden)``, without ``N x V`` logits in memory.

    Workspace beyond the inputs and the gradients' own sizes: ``chunk_size x V`` logits on either path (the inputs'
    dtype on the Triton path, fp32 on the reference path). With autograd, the Triton path computes the gradients
    in the forward pass and keeps them until the backward (``[N, C]`` in the inputs' dtype, ``[V, C]`` in fp32); the
    reference recomputes each chunk in the backward.

    Args:
        hidden: ``[N, C]`` hidden states (fp32, bf16 or fp16; under autocast, cast to autocast's dtype).
        head: the logit head (``[V, C]`` weight, ``[V]`` bias or None, multiplier, soft-cap).
        targets: ``[N]`` token ids in ``[0, V)``; ``-100`` marks positions that are not scored (NLL 0, no gradient).
        backend: ``ref``, ``triton`` or ``auto``/None (see ``lce.kernels.backend``).
        chunk_size: rows of logits alive at once. On the Triton path larger chunks mean fewer, larger matmuls and
            fewer fp32 read-modify-writes of the weight's gradient (one per chunk).

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
    return linear_cross_entropy_triton(hidden, head, targets, chunk_size)
