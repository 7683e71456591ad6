"""The public RoPE op: checks its inputs, resolves the backend and runs the reference or the Triton kernel.

``apply_rope`` rotates a layer's queries and keys (one launch on Triton), ``rope`` one tensor. On Triton the backward
pass is the inverse rotation (``RopeFunction``); positions and frequencies get no gradient.
"""

from __future__ import annotations

import torch

from lce.errors import ConfigError, LceError
from lce.kernels.backend import requested_backend, resolve_backend
from lce.kernels.rope.reference import rope_reference

STYLES = ("half", "interleaved")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class RopeFunction(torch.autograd.Function):
    """Rotation of one or two tensors by the Triton kernel; the backward rotates the gradients by ``-angle``."""

    @staticmethod
    def forward(ctx, positions, inv_freq, attention_scaling, style, q, k=None):
        from lce.kernels.rope.triton_rope import rope_triton

        ctx.save_for_backward(positions, inv_freq)
        ctx.attention_scaling, ctx.style = attention_scaling, style
        return rope_triton(q, k, positions, inv_freq, attention_scaling, style)

    @staticmethod
    def backward(ctx, *grads):
        from lce.kernels.rope.triton_rope import rope_triton

        positions, inv_freq = ctx.saved_tensors
        q_grad, k_grad = (*grads, None)[:2]
        return (None, None, None, None, *rope_triton(q_grad, k_grad, positions, inv_freq, ctx.attention_scaling,
                                                     ctx.style, inverse=True))


def _check_head_tensor(name: str, x: torch.Tensor, rotary_dim: int) -> None:
    if x.dim() != 4:
        raise LceError(f"rope: {name} must be [B, heads, T, head_dim], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise LceError(f"rope: {name} must be a floating-point tensor, got {x.dtype}")
    if rotary_dim > x.shape[-1]:
        raise LceError(f"rope: rotary dim {rotary_dim} (2 * len(inv_freq)) exceeds {name}'s head dim {x.shape[-1]}")


def _check(q, k, positions, inv_freq, style) -> None:
    if style not in STYLES:
        raise ConfigError(f"rope: style={style!r} is not one of {', '.join(STYLES)}")
    if inv_freq.dim() != 1 or not inv_freq.is_floating_point():
        raise LceError(f"rope: inv_freq must be a 1-D floating-point tensor [R/2], got {inv_freq.dtype} "
                       f"of shape {tuple(inv_freq.shape)}")
    rotary_dim = 2 * inv_freq.numel()  # even by construction: an odd rotary dim cannot be expressed
    _check_head_tensor("q" if k is not None else "x", q, rotary_dim)
    batch, _, length, _ = q.shape
    if k is not None:
        _check_head_tensor("k", k, rotary_dim)
        if (k.shape[0], k.shape[2]) != (batch, length):
            raise LceError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and length "
                           "(dims 0 and 2)")
        if k.device != q.device:
            raise LceError(f"rope: q is on {q.device} but k on {k.device}")
    if positions.dtype == torch.bool or positions.is_complex():
        raise LceError(f"rope: positions must be integer or floating-point, got {positions.dtype}")
    if positions.shape not in ((length,), (1, length), (batch, length)):
        raise LceError(f"rope: positions must be [T], [1, T] or [B, T] = [{batch}, {length}], "
                       f"got shape {tuple(positions.shape)}")
    if positions.device != q.device:
        raise LceError(f"rope: positions are on {positions.device} but the tensors on {q.device}")


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
               attention_scaling: float = 1.0, style: str = "half", backend: str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate a layer's queries and keys (one kernel launch on Triton).

    Args:
        q: ``[B, H, T, D]``; any strides (transposed views are read in place by the kernel).
        k: ``[B, HKV, T, D]`` (``HKV`` may differ from ``H``: GQA, MQA).
        positions: ``[B, T]``, ``[1, T]`` or ``[T]``, integer or floating point.
        inv_freq: ``[R/2]`` inverse frequencies (any scaling method's table); ``R <= D``.
        attention_scaling: multiplies cos and sin.
        style: ``half`` (Llama) or ``interleaved`` (GPT-J, Cohere) pairing.
        backend: ``ref``, ``triton`` or ``auto``/None (see ``lce.kernels.backend``).

    Returns:
        ``(q_rot, k_rot)`` in the inputs' shapes and dtypes.
    """
    return _rope(q, k, positions, inv_freq, attention_scaling, style, backend)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0,
         style: str = "half", backend: str | None = None) -> torch.Tensor:
    """Rotate one tensor ``x [B, H, T, D]``; arguments as ``apply_rope``."""
    return _rope(x, None, positions, inv_freq, attention_scaling, style, backend)[0]


def _backend(backend: str | None, tensors: tuple[torch.Tensor, ...]) -> str:
    """The resolved backend; ``auto`` takes the reference for dtypes the kernel does not take (float64)."""
    choice = resolve_backend(backend, *tensors)
    untaken = [x.dtype for x in tensors if x.dtype not in TRITON_DTYPES]
    if choice == "triton" and untaken:
        if requested_backend(backend) == "triton":
            raise LceError(f"rope: the triton backend takes float16, bfloat16 or float32 tensors, got {untaken[0]}; "
                           "use backend 'ref'")
        return "ref"
    return choice


def _rope(q, k, positions, inv_freq, attention_scaling, style, backend):
    tensors = (q,) if k is None else (q, k)
    _check(q, k, positions, inv_freq, style)
    if _backend(backend, tensors) == "ref":
        return tuple(rope_reference(x, positions, inv_freq, attention_scaling, style) for x in tensors)
    positions = positions if positions.dim() == 2 else positions[None]
    inv_freq = inv_freq.to(q.device, torch.float32).contiguous()
    return RopeFunction.apply(positions, inv_freq, float(attention_scaling), style, *tensors)
