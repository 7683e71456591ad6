"""Forward Triton kernel of ``lce.kernels.attention``: FlashAttention-2 (Dao 2023, arXiv:2307.08691, Algorithm 1).

One program per (query tile, batch x head[, key split]) loops over the key tiles its schedule lists
(``schedule.py``), computes the tile's logits with every modifier (``triton_common.tile_scores``: segments rotated
at their own positions, ALiBi, window, block mask), and folds them into one online softmax in fp32 (running max
``m``, sum ``l`` and output accumulator). It writes the normalised output and the log-sum-exp ``m + ln l`` the
backward pass recomputes probabilities from. Query head ``h`` reads KV head ``h // (H / HKV)`` (GQA, no copies).

Decode (flash-decoding): with a single query tile the keys are split across programs, each writing its partial
``(m, l, acc)``; ``combine_splits`` merges them exactly (softmax of a union of key sets).

Rows with no visible key have ``l = 0``: their output is 0 and their log-sum-exp -inf.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lce.kernels.attention.launch import launch_options
from lce.kernels.attention.schedule import TileSchedule
from lce.kernels.attention.spec import AttentionSpec
from lce.kernels.attention.triton_common import (
    head_columns,
    load_tile,
    logn_multiplier,
    next_power_of_2,
    segment_table,
    store_tile,
    tile_scores,
    visible_pairs,
)
from lce.kernels.backend import device_capability, on_device_of


def allocate(shape, dtype, device) -> torch.Tensor:
    """Uninitialised output memory (tests replace this with NaN-filled memory to catch unwritten tiles)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def attention_fwd_kernel(
    Q, K, V, OUT, LSE, M_PART, L_PART, Q_POS, K_POS, KV_COUNT, KV_INDEX, INV_FREQ, SEG, SLOPES, BLOCK_MASK,
    H, GROUPS, Tq, Tk, D, DV, R2, n_qt, n_kt, tiles_per_split, n_splits,
    scale, attention_scaling, inv_log_length, window, sink_tokens, mask_block, n_qb, n_kb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R2: tl.constexpr, BLOCK_REST: tl.constexpr,
    BLOCK_DV: tl.constexpr, N_SEG: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_REST: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_LOGN: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_BLOCK_MASK: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUPS

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    i = tl.load(Q_POS + b * Tq + rows, mask=row_ok, other=0)
    i_lo = tl.min(tl.where(row_ok, i, 2147483647))
    i_hi = tl.max(tl.where(row_ok, i, -2147483647))

    col1, col2, r_ok, col_rest, rest_ok = head_columns(R2, D, BLOCK_R2, BLOCK_REST, INTERLEAVED)
    q_base = Q + (pid_bh.to(tl.int64) * Tq) * D
    q1 = load_tile(q_base, rows, row_ok, col1, r_ok, D)
    q2 = load_tile(q_base, rows, row_ok, col2, r_ok, D)
    q_rest = load_tile(q_base, rows, row_ok, col_rest, rest_ok, D)
    if HAS_LOGN:
        mult = logn_multiplier(i, inv_log_length)[:, None]
        q1 = (q1.to(tl.float32) * mult).to(q_rest.dtype)
        q2 = (q2.to(tl.float32) * mult).to(q_rest.dtype)
        q_rest = (q_rest.to(tl.float32) * mult).to(q_rest.dtype)
    freq = tl.load(INV_FREQ + tl.arange(0, BLOCK_R2), mask=r_ok, other=0.0)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h)

    kv_base = (b * (H // GROUPS) + hk).to(tl.int64) * Tk
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    count = tl.load(KV_COUNT + b * n_qt + pid_m)
    first = pid_s * tiles_per_split
    last = tl.minimum(count, first + tiles_per_split)
    for t in range(first, last):
        kt = tl.load(KV_INDEX + (b * n_qt + pid_m).to(tl.int64) * n_kt + t)
        cols = kt * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < Tk
        j = tl.load(K_POS + b * Tk + cols, mask=col_ok, other=0)
        j_lo = tl.min(tl.where(col_ok, j, 2147483647))
        j_hi = tl.max(tl.where(col_ok, j, -2147483647))
        k1 = load_tile(K + kv_base * D, cols, col_ok, col1, r_ok, D)
        k2 = load_tile(K + kv_base * D, cols, col_ok, col2, r_ok, D)
        k_rest = load_tile(K + kv_base * D, cols, col_ok, col_rest, rest_ok, D)
        v = load_tile(V + kv_base * DV, cols, col_ok, offs_dv, dv_ok, DV)
        visible = visible_pairs(i, j, row_ok, col_ok, window, sink_tokens, BLOCK_MASK, mask_block, n_qb, n_kb,
                                HAS_WINDOW, HAS_BLOCK_MASK)
        scores, _ = tile_scores(q1, q2, q_rest, k1, k2, k_rest, i, j, visible, i_lo, i_hi, j_lo, j_hi, SEG, freq,
                                attention_scaling, scale, slope, BLOCK_M, BLOCK_N, N_SEG, HAS_REST, HAS_ALIBI,
                                DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead keeps exp() at 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if SPLIT:
        part = (pid_bh * n_splits + pid_s).to(tl.int64) * Tq
        tl.store(M_PART + part + rows, m_i, mask=row_ok)
        tl.store(L_PART + part + rows, l_i, mask=row_ok)
        store_tile(OUT + part * DV, acc, rows, row_ok, offs_dv, dv_ok, DV)
    else:
        alive = l_i > 0
        out = acc / tl.where(alive, l_i, 1.0)[:, None]
        lse = tl.where(alive, m_i + tl.log(tl.where(alive, l_i, 1.0)), float("-inf"))
        tl.store(LSE + pid_bh.to(tl.int64) * Tq + rows, lse, mask=row_ok)
        # OUT is [B, Tq, H, Dv]: row t of head h sits at ((b * Tq + t) * H + h) * Dv.
        out_base = OUT + (b.to(tl.int64) * Tq * H + h) * DV
        store_tile(out_base, out.to(OUT.dtype.element_ty), rows, row_ok, offs_dv, dv_ok, H * DV)


def kernel_config(spec: AttentionSpec, q: torch.Tensor, v: torch.Tensor) -> dict:
    """Compile-time switches and tile widths shared by the forward and backward launches."""
    d = q.shape[-1]
    r2 = spec.rotary.inv_freq.numel() if spec.segments else 0
    return {
        "R2": r2,
        "BLOCK_R2": next_power_of_2(r2),
        "BLOCK_REST": next_power_of_2(d - 2 * r2),
        "BLOCK_DV": next_power_of_2(v.shape[-1]),
        "N_SEG": len(spec.segments),
        "INTERLEAVED": bool(spec.segments) and spec.rotary.style == "interleaved",
        "HAS_REST": d > 2 * r2,
        "HAS_ALIBI": spec.alibi_slopes is not None,
        "HAS_LOGN": spec.logn_length is not None,
        "HAS_WINDOW": spec.window is not None,
        "HAS_BLOCK_MASK": spec.block_mask is not None,
        # fp32 inputs: exact fp32 products (tf32 would lose 13 bits of mantissa); fp16/bf16: tensor cores.
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def spec_arguments(spec: AttentionSpec, q: torch.Tensor) -> dict:
    """The spec's tensors and scalars as kernel arguments (dummies where a feature is off)."""
    device = q.device
    dummy_f = torch.zeros(1, dtype=torch.float32, device=device)
    mask = spec.block_mask
    return {
        "INV_FREQ": spec.rotary.inv_freq.to(torch.float32).contiguous() if spec.segments else dummy_f,
        "SEG": segment_table(spec, device),
        "SLOPES": spec.alibi_slopes.to(torch.float32).contiguous() if spec.alibi_slopes is not None else dummy_f,
        "BLOCK_MASK": mask.to(torch.int8).contiguous() if mask is not None else torch.zeros(1, dtype=torch.int8,
                                                                                            device=device),
        "scale": float(spec.scale),
        "attention_scaling": float(spec.rotary.attention_scaling) if spec.segments else 1.0,
        "inv_log_length": 1.0 / math.log(spec.logn_length) if spec.logn_length is not None else 0.0,
        "window": spec.window or 0,
        "sink_tokens": spec.sink_tokens,
        "mask_block": spec.block_size or 1,
        "n_qb": mask.shape[0] if mask is not None else 0,
        "n_kb": mask.shape[1] if mask is not None else 0,
    }


def combine_splits(m_part: torch.Tensor, l_part: torch.Tensor, acc_part: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge flash-decoding partials ``m, l [B, H, S, Tq]``, ``acc [B, H, S, Tq, Dv]`` (fp32) into the output
    ``[B, Tq, H, Dv]`` and log-sum-exp ``[B, H, Tq]``: rescale every split to the common max, add, normalise."""
    m = m_part.amax(dim=2)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    weight = torch.exp(m_part - m_safe[:, :, None])  # a split with no visible key has m = -inf: weight 0
    total = (weight * l_part).sum(dim=2)
    acc = (weight[..., None] * acc_part).sum(dim=2)
    alive = total > 0
    out = acc / torch.where(alive, total, torch.ones_like(total))[..., None]
    lse = torch.where(alive, m_safe + torch.log(total), torch.full_like(total, float("-inf")))
    return out.transpose(1, 2).to(dtype).contiguous(), lse


def forward_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   m_part: torch.Tensor, l_part: torch.Tensor, spec: AttentionSpec, q_pos: torch.Tensor,
                   k_pos: torch.Tensor, schedule: TileSchedule, n_splits: int,
                   capability: tuple[int, int] | None) -> tuple[tuple[int, int, int], dict]:
    """The grid and every keyword argument of one ``attention_fwd_kernel`` launch (tensors, scalars, constexprs,
    ``num_warps``/``num_stages``). ``attention_forward`` launches with it and ``lce.kernels.inspect`` compiles with it
    (on meta tensors), so the compile check sees exactly what runs."""
    batch, heads, tq, d = q.shape
    kv_heads, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
    n_qt, n_kt = schedule.kv_count.shape[1], schedule.kv_index.shape[2]
    split = n_splits > 1
    kwargs = dict(
        Q=q, K=k, V=v, OUT=out, LSE=lse, M_PART=m_part, L_PART=l_part, Q_POS=q_pos, K_POS=k_pos,
        KV_COUNT=schedule.kv_count, KV_INDEX=schedule.kv_index,
        H=heads, GROUPS=heads // kv_heads, Tq=tq, Tk=tk, D=d, DV=dv, n_qt=n_qt, n_kt=n_kt,
        tiles_per_split=-(-n_kt // n_splits), n_splits=n_splits, BLOCK_M=schedule.block_m, BLOCK_N=schedule.block_n,
        SPLIT=split, **spec_arguments(spec, q), **kernel_config(spec, q, v),
        **launch_options("forward", q.dtype, max(d, dv), capability),
    )
    return (n_qt, batch * heads, n_splits), kwargs


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, q_pos: torch.Tensor,
                      k_pos: torch.Tensor, schedule: TileSchedule,
                      n_splits: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel.

    Args:
        q: ``[B, H, Tq, D]``, k: ``[B, HKV, Tk, D]``, v: ``[B, HKV, Tk, Dv]``, contiguous, one dtype.
        spec: what to compute (checked by the caller).
        q_pos, k_pos: ``[B, Tq]``, ``[B, Tk]`` int32, contiguous.
        schedule: the tile lists (``build_schedule``) for these positions.
        n_splits: programs sharing the key tiles of one query tile (flash-decoding; > 1 only with one query tile).

    Returns:
        ``out [B, Tq, H, Dv]`` in ``q.dtype`` and ``lse [B, H, Tq]`` fp32.
    """
    batch, heads, tq, _ = q.shape
    dv = v.shape[-1]
    split = n_splits > 1
    lse = allocate((batch, heads, tq), torch.float32, q.device)
    if split:
        out = allocate((batch, heads, n_splits, tq, dv), torch.float32, q.device)
        m_part = allocate((batch, heads, n_splits, tq), torch.float32, q.device)
        l_part = allocate((batch, heads, n_splits, tq), torch.float32, q.device)
    else:
        out = allocate((batch, tq, heads, dv), q.dtype, q.device)
        m_part = l_part = lse
    grid, kwargs = forward_launch(q, k, v, out, lse, m_part, l_part, spec, q_pos, k_pos, schedule, n_splits,
                                  device_capability(q))
    with on_device_of(q):
        attention_fwd_kernel[grid](**kwargs)
    if split:
        return combine_splits(m_part, l_part, out, q.dtype)
    return out, lse
