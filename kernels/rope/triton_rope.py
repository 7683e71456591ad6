"""Fused RoPE in Triton: queries and keys of one layer rotated in one launch, forward and inverse.

One program per ``(b, t)`` row computes the ``R/2`` angles once (fp32, as the reference) and rotates every query
head and every key head of that row (``[H, R/2]`` and ``[HKV, R/2]`` tiles), copying the pass-through dims. Inputs
are read through their strides (q and k usually arrive as transposed views of the projections), math is fp32 and
outputs are contiguous ``[B, H, T, D]`` in the input's dtype. The inverse (``sign = -1``, the rotation by ``-angle``
scaled by ``attention_scaling``) is the backward pass: a rotation's Jacobian is its transpose.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lce.kernels.backend import on_device_of


@triton.jit
def head_offsets(h, stride_h, d, stride_d):
    """``h * stride_h + d * stride_d`` in int64 for heads ``h [BLOCK_H, 1]`` and dims ``d [1, N]``: a head stride
    is ``T * D`` for ``[B, H, T, D]`` tensors (the outputs, contiguous inputs), and ``H * T * D`` passes 2^31 at 1M
    tokens of 32 heads x 128, where an int32 product would wrap to a wrong address."""
    return h.to(tl.int64) * stride_h + d * stride_d


@triton.jit
def _rotate_heads(x_ptr, stride_h, stride_d, out_ptr, out_stride_h, heads, cos, sin,
                  HALF: tl.constexpr, D: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    """Rotate the ``heads`` head vectors of one ``(b, t)`` row (``x_ptr`` points at head 0, dim 0)."""
    h = tl.arange(0, BLOCK_H)[:, None]
    pair = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < heads) & (pair < HALF)
    if INTERLEAVED:
        first, second = 2 * pair, 2 * pair + 1
    else:
        first, second = pair, pair + HALF
    x1 = tl.load(x_ptr + head_offsets(h, stride_h, first, stride_d), mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + head_offsets(h, stride_h, second, stride_d), mask=mask, other=0.0).to(tl.float32)
    out_dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + head_offsets(h, out_stride_h, first, 1), (x1 * cos - x2 * sin).to(out_dtype), mask=mask)
    tl.store(out_ptr + head_offsets(h, out_stride_h, second, 1), (x2 * cos + x1 * sin).to(out_dtype), mask=mask)
    if D > 2 * HALF:  # partial rotary: the remaining dims are copied
        d = 2 * HALF + tl.arange(0, BLOCK_PASS)[None, :]
        rest = (h < heads) & (d < D)
        tl.store(out_ptr + head_offsets(h, out_stride_h, d, 1),
                 tl.load(x_ptr + head_offsets(h, stride_h, d, stride_d), mask=rest), mask=rest)


@triton.jit
def rope_fwd_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, inv_freq_ptr, T, H, HKV,
                    stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                    stride_pb, stride_pt, scaling, sign,
                    HALF: tl.constexpr, DQ: tl.constexpr, DK: tl.constexpr, INTERLEAVED: tl.constexpr,
                    HAS_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
                    BLOCK_PASS_Q: tl.constexpr, BLOCK_PASS_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # offsets past 2^31 elements (long contexts, large batches)
    b = row // T
    t = row % T
    position = tl.load(pos_ptr + b * stride_pb + t * stride_pt).to(tl.float32)
    pair = tl.arange(0, BLOCK_HALF)[None, :]
    inv_freq = tl.load(inv_freq_ptr + pair, mask=pair < HALF, other=0.0)
    angle = position * inv_freq
    cos = tl.cos(angle) * scaling
    sin = tl.sin(angle) * scaling * sign
    _rotate_heads(q_ptr + b * stride_qb + t * stride_qt, stride_qh, stride_qd,
                  q_out_ptr + (b * H * T + t) * DQ, T * DQ, H, cos, sin,
                  HALF, DQ, INTERLEAVED, BLOCK_H, BLOCK_HALF, BLOCK_PASS_Q)
    if HAS_K:
        _rotate_heads(k_ptr + b * stride_kb + t * stride_kt, stride_kh, stride_kd,
                      k_out_ptr + (b * HKV * T + t) * DK, T * DK, HKV, cos, sin,
                      HALF, DK, INTERLEAVED, BLOCK_HKV, BLOCK_HALF, BLOCK_PASS_K)


#: Warps and pipeline stages of the launch (Triton's defaults, stated so ``lce.kernels.inspect`` compiles what runs).
LAUNCH_OPTIONS = {"num_warps": 4, "num_stages": 3}


def _block(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def rope_launch(q: torch.Tensor, k: torch.Tensor | None, q_out: torch.Tensor, k_out: torch.Tensor,
                positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float, style: str,
                inverse: bool) -> tuple[tuple[int], dict]:
    """The grid and keyword arguments of one ``rope_fwd_kernel`` launch (``lce.kernels.inspect`` compiles them)."""
    batch, heads, length, dim_q = q.shape
    kv_heads, dim_k = (k.shape[1], k.shape[3]) if k is not None else (0, 0)
    half = inv_freq.numel()
    k_in = k if k is not None else q
    stride_pb = positions.stride(0) if positions.shape[0] > 1 else 0
    names = ("stride_qb", "stride_qh", "stride_qt", "stride_qd", "stride_kb", "stride_kh", "stride_kt", "stride_kd")
    kwargs = dict(
        q_ptr=q, k_ptr=k_in, q_out_ptr=q_out, k_out_ptr=k_out, pos_ptr=positions, inv_freq_ptr=inv_freq, T=length,
        H=heads, HKV=kv_heads, **dict(zip(names, (*q.stride(), *k_in.stride()))), stride_pb=stride_pb,
        stride_pt=positions.stride(1), scaling=float(attention_scaling), sign=-1.0 if inverse else 1.0,
        HALF=half, DQ=dim_q, DK=dim_k, INTERLEAVED=style == "interleaved", HAS_K=k is not None,
        BLOCK_H=_block(heads), BLOCK_HKV=_block(kv_heads), BLOCK_HALF=_block(half),
        BLOCK_PASS_Q=_block(dim_q - 2 * half), BLOCK_PASS_K=_block(dim_k - 2 * half), **LAUNCH_OPTIONS,
    )
    return (batch * length,), kwargs


def rope_triton(q: torch.Tensor, k: torch.Tensor | None, positions: torch.Tensor, inv_freq: torch.Tensor,
                attention_scaling: float, style: str, inverse: bool = False) -> tuple[torch.Tensor, ...]:
    """Rotate ``q [B, H, T, DQ]`` and ``k [B, HKV, T, DK]`` (or only ``q`` when ``k`` is None) in one launch.

    Args:
        positions: ``[B, T]`` or ``[1, T]`` (broadcast over the batch) on the tensors' device.
        inv_freq: ``[R/2]`` fp32, contiguous.
        inverse: rotate by ``-angle`` (the backward pass).

    Returns:
        The rotated tensors, contiguous, each in its input's dtype.
    """
    batch, heads, length, dim_q = q.shape
    kv_heads, dim_k = (k.shape[1], k.shape[3]) if k is not None else (0, 0)
    q_out = torch.empty((batch, heads, length, dim_q), dtype=q.dtype, device=q.device)
    k_out = torch.empty((batch, kv_heads, length, dim_k), dtype=k.dtype, device=k.device) if k is not None else q_out
    grid, kwargs = rope_launch(q, k, q_out, k_out, positions, inv_freq, attention_scaling, style, inverse)
    with on_device_of(q):
        rope_fwd_kernel[grid](**kwargs)
    return (q_out, k_out) if k is not None else (q_out,)
