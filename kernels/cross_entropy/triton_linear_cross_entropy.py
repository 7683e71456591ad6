"""Triton kernels of the fused linear cross-entropy: logits are recomputed tile by tile and never written to memory.

Forward (one program per block of ``BLOCK_N`` rows): for each ``BLOCK_V`` vocabulary tile, the logit tile
``z = c * tanh(m * (h W^T + b) / c)`` is accumulated in fp32 over ``BLOCK_C`` slices of the hidden size, then folded
into an online log-sum-exp (running max and rescaled sum, as in FlashAttention) while the target's logit is picked
out of the same tile. Stores ``nll [N]`` and ``lse [N]``. This is the idea of Apple's Cut Cross-Entropy (Wijmans et
al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv:2411.09009: the target logit as an indexed
matmul, the log-sum-exp over the vocabulary on chip) and of Liger-Kernel's fused linear cross-entropy, here without
Liger's materialised chunks and without CCE's gradient filtering (the backward is exact).

Backward: with ``p = exp(z - lse)`` and upstream ``g [N]``, the gradient of the logits before the multiplier and
soft-cap is ``dS = (p - onehot(target)) * g * m * (1 - (z / c)^2)`` (the last factor is tanh's derivative; it is 1
without a soft-cap). Two kernels recompute each ``dS`` tile from ``lse``:

- ``dh`` kernel, one program per row block: ``dH[rows] += dS W[tile]`` over all vocabulary tiles;
- ``dw`` kernel, one program per vocabulary tile: ``dW[tile] += dS^T H[rows]`` and ``db[tile] += sum_rows dS``
  over all row blocks.

Each program owns its output rows, so there are no atomics and the result is deterministic. Workspace: the O(N)
``lse`` kept between forward and backward plus one tile per program; the gradients accumulate in fp32 buffers of the
gradients' own shapes (``[N, C]`` and ``[V, C]``: the outputs themselves for fp32 inputs). Cost: forward ``2NVC``
flops, backward ``8NVC`` (logits recomputed by both backward kernels).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lce.kernels.backend import interpreting, on_device_of
from lce.kernels.cross_entropy.reference import IGNORE_INDEX


@triton.jit
def _tanh(x):
    # exp of a non-positive argument never overflows; Triton has no portable tanh across the GPU and the interpreter.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b``. ``UPCAST`` (bf16 under the interpreter only): Triton's interpreter multiplies bf16 bit patterns
    (triton-lang/triton#11584; its docs say to cast bf16 to fp32), and fp32 products of bf16 values are exact, as on
    the GPU's bf16 MMA, so only the summation order differs."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, C, multiplier, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    """Logits ``z [BLOCK_N, BLOCK_V]`` (fp32) and ``dz/ds`` of ``s = h W^T + b`` for rows x cols; h, W contiguous."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    row_in = rows < N
    col_in = cols < V
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_in = cs < C
        h = tl.load(h_ptr + rows[:, None] * C + cs[None, :], mask=row_in[:, None] & c_in[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * C + cs[None, :], mask=col_in[:, None] & c_in[None, :], other=0.0)
        acc = _dot(h, tl.trans(w), acc, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    z = acc * multiplier
    if HAS_SOFTCAP:
        t = _tanh(z / softcap)
        z = softcap * t
        dz_ds = multiplier * (1.0 - t * t)
    else:
        dz_ds = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32) + multiplier
    return z, dz_ds


@triton.jit
def lce_fwd_kernel(h_ptr, w_ptr, b_ptr, targets_ptr, nll_ptr, lse_ptr, N, V, C, multiplier, softcap, ignore_index,
                   HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_in = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_in, other=ignore_index)
    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        z, _ = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, C, multiplier, softcap,
                           HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_C)
        z = tl.where((cols < V)[None, :], z, float("-inf"))
        # Every tile holds at least one real column, so new_max is finite and exp(-inf - new_max) = 0 on the first.
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        running_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
    lse = running_max + tl.log(running_sum)
    nll = tl.where(targets == ignore_index, 0.0, lse - target_logit)
    tl.store(nll_ptr + rows, nll, mask=row_in)
    tl.store(lse_ptr + rows, lse, mask=row_in)


@triton.jit
def _dlogit_tile(h_ptr, w_ptr, b_ptr, targets, lse, grad, rows, cols, N, V, C, multiplier, softcap,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    """``dS [BLOCK_N, BLOCK_V]`` (fp32). Zero on ignored rows (``grad`` 0) and on padding rows past N (``lse`` +inf,
    so ``p`` is 0 even where exp of the logit would overflow); padding columns past V meet zero rows of W in the
    ``dh`` kernel and are never stored by the ``dw`` kernel."""
    z, dz_ds = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, C, multiplier, softcap,
                           HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_C)
    probs = tl.exp(z - lse[:, None])
    onehot = (cols[None, :] == targets[:, None]).to(tl.float32)
    return (probs - onehot) * grad[:, None] * dz_ds


@triton.jit
def _row_stats(targets_ptr, lse_ptr, grad_ptr, rows, N, ignore_index):
    row_in = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_in, other=ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_in, other=float("inf"))
    grad = tl.load(grad_ptr + rows, mask=row_in, other=0.0)
    return targets, lse, tl.where(targets == ignore_index, 0.0, grad)


@triton.jit
def lce_bwd_dh_kernel(h_ptr, w_ptr, b_ptr, targets_ptr, lse_ptr, grad_ptr, dh_ptr, N, V, C, multiplier, softcap,
                      ignore_index, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    """``dh [N, C]`` fp32, zero-initialised: ``dh[rows] = sum over tiles dS W[tile]``."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_in = rows < N
    targets, lse, grad = _row_stats(targets_ptr, lse_ptr, grad_ptr, rows, N, ignore_index)
    for v0 in range(0, V, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        ds = _dlogit_tile(h_ptr, w_ptr, b_ptr, targets, lse, grad, rows, cols, N, V, C, multiplier, softcap,
                          HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_C)
        # The loop below reads back the dh tiles this program stored for the previous vocabulary tile. Triton may
        # give the store and the load different thread layouts and inserts no barrier for global memory, so another
        # thread's store could still be in flight (triton-lang/triton#10924): synchronise the block first.
        tl.debug_barrier()
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            c_in = cs < C
            w = tl.load(w_ptr + cols[:, None] * C + cs[None, :], mask=(cols < V)[:, None] & c_in[None, :], other=0.0)
            out = dh_ptr + rows[:, None] * C + cs[None, :]
            out_in = row_in[:, None] & c_in[None, :]
            dh = tl.load(out, mask=out_in, other=0.0)
            dh = _dot(ds.to(w.dtype), w, dh, DOT_PRECISION, UPCAST)
            tl.store(out, dh, mask=out_in)


@triton.jit
def lce_bwd_dw_kernel(h_ptr, w_ptr, b_ptr, targets_ptr, lse_ptr, grad_ptr, dw_ptr, db_ptr, N, V, C, multiplier,
                      softcap, ignore_index, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    """``dw [V, C]`` fp32, zero-initialised: ``dw[tile] = sum over row blocks dS^T H[rows]``; ``db [V]`` fp32 the
    column sums of ``dS`` when the head has a bias."""
    cols = (tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_in = cols < V
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        targets, lse, grad = _row_stats(targets_ptr, lse_ptr, grad_ptr, rows, N, ignore_index)
        ds = _dlogit_tile(h_ptr, w_ptr, b_ptr, targets, lse, grad, rows, cols, N, V, C, multiplier, softcap,
                          HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_C)
        db += tl.sum(ds, axis=0)
        tl.debug_barrier()  # dw tiles stored for the previous row block are read back below (see the dh kernel)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            c_in = cs < C
            h = tl.load(h_ptr + rows[:, None] * C + cs[None, :], mask=(rows < N)[:, None] & c_in[None, :], other=0.0)
            out = dw_ptr + cols[:, None] * C + cs[None, :]
            out_in = col_in[:, None] & c_in[None, :]
            dw = tl.load(out, mask=out_in, other=0.0)
            dw = _dot(tl.trans(ds).to(h.dtype), h, dw, DOT_PRECISION, UPCAST)
            tl.store(out, dw, mask=out_in)
    if HAS_BIAS:
        tl.store(db_ptr + cols, db, mask=col_in)


#: Warps and pipeline stages of the three kernels (Triton's defaults, stated so ``lce.kernels.inspect`` compiles what
#: runs).
LAUNCH_OPTIONS = {"num_warps": 4, "num_stages": 3}


def _meta(hidden: torch.Tensor, bias: torch.Tensor | None, softcap: float | None, blocks: tuple[int, int, int]) -> dict:
    block_n, block_v, block_c = blocks
    return {
        "HAS_BIAS": bias is not None, "HAS_SOFTCAP": softcap is not None,
        # tf32 would cost fp32 inputs ~1e-3 relative error in the logits; bf16/fp16 products are exact anyway.
        "DOT_PRECISION": "ieee" if hidden.dtype == torch.float32 else "tf32",
        "UPCAST": hidden.dtype == torch.bfloat16 and interpreting(),
        "BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_C": block_c, **LAUNCH_OPTIONS,
    }


def lce_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
            multiplier: float, softcap: float | None,
            blocks: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nll [N], lse [N])`` fp32 for contiguous ``hidden [N, C]``, ``weight [V, C]``, ``bias [V]``,
    ``targets [N]``."""
    (n, c), v = hidden.shape, weight.shape[0]
    nll = hidden.new_empty(n, dtype=torch.float32)
    lse = hidden.new_empty(n, dtype=torch.float32)
    if n:
        with on_device_of(hidden):
            lce_fwd_kernel[(triton.cdiv(n, blocks[0]),)](
                hidden, weight, hidden if bias is None else bias, targets, nll, lse, n, v, c, float(multiplier),
                float(softcap or 1.0), IGNORE_INDEX, **_meta(hidden, bias, softcap, blocks),
            )
    return nll, lse


def lce_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
            lse: torch.Tensor, grad_nll: torch.Tensor, multiplier: float, softcap: float | None,
            blocks: tuple[int, int, int], need_dh: bool, need_dw: bool):
    """``(dh [N, C] | None, dw [V, C] | None, db [V] | None)`` in the inputs' dtypes, from ``lse`` and the upstream
    ``grad_nll [N]`` (fp32, contiguous)."""
    (n, c), v = hidden.shape, weight.shape[0]
    meta = _meta(hidden, bias, softcap, blocks)
    args = (targets, lse, grad_nll)
    scalars = (float(multiplier), float(softcap or 1.0), IGNORE_INDEX)
    dh = dw = db = None
    if need_dh:
        dh = torch.zeros(n, c, device=hidden.device, dtype=torch.float32)
        if n:
            with on_device_of(hidden):
                lce_bwd_dh_kernel[(triton.cdiv(n, blocks[0]),)](
                    hidden, weight, hidden if bias is None else bias, *args, dh, n, v, c, *scalars, **meta)
        dh = dh.to(hidden.dtype)
    if need_dw:
        dw = torch.zeros(v, c, device=weight.device, dtype=torch.float32)
        db = None if bias is None else torch.zeros(v, device=weight.device, dtype=torch.float32)
        if n:
            with on_device_of(hidden):
                lce_bwd_dw_kernel[(triton.cdiv(v, blocks[1]),)](
                    hidden, weight, hidden if bias is None else bias, *args, dw, dw if db is None else db, n, v, c,
                    *scalars, **meta)
        dw = dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
    return dh, dw, db
