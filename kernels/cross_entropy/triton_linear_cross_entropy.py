"""Fused linear cross-entropy in the manner of Liger-Kernel: logits one chunk of rows at a time, their gradient
computed in the forward pass by a Triton kernel, and every product with the weight a cuBLAS matmul.

For a chunk of ``k`` rows (``k <= chunk_size``) and the head ``(W [V, C], b [V], m, c)``:

1. ``s = h W^T + b`` with ``torch.mm``/``torch.addmm`` into one reused ``[chunk_size, V]`` buffer in the inputs'
   dtype (the logits the model's own forward would form, as ``reference.py`` does);
2. ``lce_chunk_kernel``, one program per row, reads ``s`` in ``BLOCK_V`` slices: ``z = c * tanh(m * s / c)``, an
   online log-sum-exp (running max and rescaled sum, as in FlashAttention) and ``nll = lse - z[target]``, all in
   fp32; then, when a gradient is wanted, a second pass overwrites ``s`` in place with the gradient of the NLL with
   respect to ``s``: ``dS = (softmax(z) - onehot(target)) * m * (1 - (z / c)^2) * w`` (the last factor before ``w``
   is tanh's derivative, 1 without a soft-cap; ``w`` is 1, or the upstream gradient of the row in the backward's
   recomputation below, and 0 on rows whose target is ``-100``);
3. ``dh[rows] = dS W`` (``torch.mm`` straight into the rows of ``dh``), ``dW += dS^T h`` (fp32 accumulator; on CUDA
   bf16/fp16 products accumulate into it inside cuBLAS's epilogue where torch offers it, else each chunk's product
   is rounded to bf16/fp16 first), ``db += sum_rows dS`` (fp32).

Memory beyond the inputs and the gradients' own sizes: one chunk of logits, ``chunk_size x V`` in the inputs' dtype,
never ``N x V``. Cost: ``6NVC`` flops (``2NVC`` per matmul) and two reads and one write of each chunk's logits, with
one fp32 read-modify-write of ``dW`` per chunk (not per tile). Without a gradient: ``2NVC`` flops and one read.

Why the gradient can be taken in the forward pass although ``linear_cross_entropy`` returns per-token NLL: with
upstream gradients ``g [N]``, ``dh`` is ``g[:, None] * dh|_{g=1}`` row by row, exact for any ``g``; ``dW`` and
``db`` are sums over rows, so they scale only when ``g`` takes one value on every scored row (the training loss
``nll.sum() / scored`` and any mean or sum of the NLL). The backward checks that (``uniform_value``, one host
synchronisation) and otherwise recomputes ``dW`` and ``db`` chunk by chunk with ``w = g`` (``2`` more matmuls per
chunk), so every upstream gradient is exact. Liger-Kernel (``src/liger_kernel/ops/fused_linear_cross_entropy.py``)
scales by a scalar only and defers ``reduction="none"`` to a recomputation in the backward.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lce.kernels.backend import on_device_of
from lce.kernels.cross_entropy.reference import IGNORE_INDEX

#: Vocabulary columns per slice of a row: 16 fp32 values per thread at 8 warps (no spills), and the loop over a
#: 128k vocabulary is 32 slices long.
BLOCK_V = 4096
#: Warps and pipeline stages of the kernel (stated so ``lce.kernels.inspect`` compiles what runs).
LAUNCH_OPTIONS = {"num_warps": 8, "num_stages": 1}


@triton.jit
def _tanh(x):
    # exp of a non-positive argument never overflows; Triton has no portable tanh across the GPU and the interpreter.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _capped(s, multiplier, softcap, HAS_SOFTCAP: tl.constexpr):
    """``(z, dz/ds)`` (fp32) of raw logits ``s``: ``z = c * tanh(m * s / c)``, or ``m * s`` without a soft-cap."""
    z = s * multiplier
    if HAS_SOFTCAP:
        t = _tanh(z / softcap)
        return softcap * t, multiplier * (1.0 - t * t)
    return z, multiplier + tl.zeros_like(z)


@triton.jit
def lce_chunk_kernel(logits_ptr, targets_ptr, scale_ptr, nll_ptr, V, stride_row, multiplier, softcap, ignore_index,
                     HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    """One row of raw logits ``s [V]`` (the inputs' dtype): ``nll`` (fp32) and, with ``COMPUTE_GRAD``, ``dS``
    written over ``s``, weighted by ``scale[row]`` when ``HAS_SCALE`` (else 1)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    scored = target != ignore_index
    running_max = float("-inf")
    running_sum = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        s = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
        z, _ = _capped(s, multiplier, softcap, HAS_SOFTCAP)
        # After the soft-cap: a padding column must be -inf in z, whatever sign the multiplier has.
        z = tl.where(cols < V, z, float("-inf"))
        # Every slice holds a real column, so new_max is finite and exp(-inf - new_max) = 0 on the first.
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    s_target = tl.load(row_ptr + tl.where(scored, target, 0)).to(tl.float32)
    z_target, _ = _capped(s_target, multiplier, softcap, HAS_SOFTCAP)
    tl.store(nll_ptr + row, tl.where(scored, lse - z_target, 0.0))
    if COMPUTE_GRAD:
        weight = 1.0
        if HAS_SCALE:
            weight = tl.load(scale_ptr + row)
        weight = tl.where(scored, weight, 0.0)
        # Reads and writes the same addresses with the same layout, each element by the one thread that read it.
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            s = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            z, dz_ds = _capped(s, multiplier, softcap, HAS_SOFTCAP)
            probs = tl.exp(z - lse)
            ds = (probs - tl.where(cols == target, 1.0, 0.0)) * dz_ds * weight
            tl.store(row_ptr + cols, ds.to(logits_ptr.dtype.element_ty), mask=cols < V)


def chunk_launch(logits: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor | None, nll: torch.Tensor,
                 multiplier: float, softcap: float | None, compute_grad: bool,
                 block_v: int = BLOCK_V) -> tuple[tuple[int], dict]:
    """The grid and keyword arguments of one ``lce_chunk_kernel`` launch over ``logits [k, V]`` (rows contiguous),
    ``targets [k]``, ``row_scale [k]`` fp32 or None, ``nll [k]`` fp32 (``lce.kernels.inspect`` compiles them)."""
    k, v = logits.shape
    kwargs = dict(
        logits_ptr=logits, targets_ptr=targets, scale_ptr=nll if row_scale is None else row_scale, nll_ptr=nll, V=v,
        stride_row=logits.stride(0), multiplier=float(multiplier), softcap=float(softcap or 1.0),
        ignore_index=IGNORE_INDEX, HAS_SOFTCAP=softcap is not None, HAS_SCALE=row_scale is not None,
        COMPUTE_GRAD=compute_grad, BLOCK_V=min(block_v, triton.next_power_of_2(v)), **LAUNCH_OPTIONS,
    )
    return (k,), kwargs


@functools.cache
def _fp32_out_addmm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc_fp32, a, b, out_dtype=torch.float32, out=acc_fp32)`` runs for ``dtype`` operands on
    ``device`` (cuBLAS on CUDA since torch 2.8, with the fp32 accumulator as ``self`` only in later versions)."""
    acc = torch.ones(2, 2, device=device)
    a = torch.ones(2, 2, device=device, dtype=dtype)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return bool(torch.all(acc == 3))  # 1 + (1 + 1): the accumulator was added, not overwritten


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an fp32 ``acc``: inside the matmul where torch can (bf16/fp16 on CUDA: one read and one
    write of ``acc``, products never rounded to half precision), else through a product in ``a``'s dtype."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and _fp32_out_addmm(acc.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += a @ b


def lce_chunked(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                multiplier: float, softcap: float | None, chunk_size: int, block_v: int = BLOCK_V,
                need_dh: bool = False, need_dw: bool = False, need_db: bool = False,
                row_scale: torch.Tensor | None = None):
    """``(nll [N] fp32, dh [N, C] | None, dw [V, C] fp32 | None, db [V] fp32 | None)`` of contiguous ``hidden
    [N, C]``, ``weight [V, C]``, ``bias [V]``, ``targets [N]``, one chunk of ``chunk_size`` rows at a time.

    The gradients are those of ``sum(nll * w)`` with ``w = row_scale [N]`` (fp32, contiguous), or 1 when None;
    ``dh`` is in ``hidden``'s dtype, ``dw`` and ``db`` are fp32 accumulators. No gradient is computed when none is
    asked for.
    """
    (n, c), v = hidden.shape, weight.shape[0]
    compute_grad = need_dh or need_dw or need_db
    nll = hidden.new_empty(n, dtype=torch.float32)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros(v, c, device=weight.device, dtype=torch.float32) if need_dw else None
    db = torch.zeros(v, device=weight.device, dtype=torch.float32) if need_db else None
    if n == 0:
        return nll, dh, dw, db
    rows = min(chunk_size, n)
    buffer = hidden.new_empty(rows, v)
    # Our own casts already match autocast's; autocast would otherwise re-cast the fp32 accumulations below.
    with on_device_of(hidden), torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, n, rows):
            h = hidden[start : start + rows]
            end = start + h.shape[0]
            logits = buffer[: h.shape[0]]
            if bias is None:
                torch.mm(h, weight.t(), out=logits)
            else:
                torch.addmm(bias, h, weight.t(), out=logits)
            scale = None if row_scale is None else row_scale[start:end]
            grid, kwargs = chunk_launch(logits, targets[start:end], scale, nll[start:end], multiplier, softcap,
                                        compute_grad, block_v)
            lce_chunk_kernel[grid](**kwargs)
            if need_dh:
                torch.mm(logits, weight, out=dh[start:end])
            if need_dw:
                _accumulate_fp32(dw, logits.t(), h)
            if need_db:
                db += logits.sum(0, dtype=torch.float32)
    return nll, dh, dw, db


def uniform_value(grad: torch.Tensor, targets: torch.Tensor) -> float | None:
    """The value ``grad [N]`` takes on every scored row (``targets != -100``; 0.0 when none is scored), or None when
    it takes several (or NaN). One host synchronisation."""
    scored = targets != IGNORE_INDEX
    if grad.numel() == 0:
        return 0.0
    low = torch.where(scored, grad, float("inf")).amin()
    high = torch.where(scored, grad, float("-inf")).amax()
    low, high = torch.stack([low, high]).tolist()
    if low > high:  # nothing scored: every precomputed gradient is zero
        return 0.0
    return low if low == high else None
