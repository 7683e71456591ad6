"""Forward Triton kernel of ``lce.kernels.attention``: FlashAttention-2 (Dao 2023, arXiv:2307.08691, Algorithm 1).

One program per (query tile, batch x head[, key split]) runs, for each segment (one without segments), over the key
tiles its schedule lists for that segment (``schedule.py``): first the full tiles, whose logits need no mask, then the
partial ones with the exact per-pair rules (window, sinks, block mask, the segment's pair selection). Queries and keys
arrive rotated once per position map (``prerotate.py``), so a segment's logits are one tile product of ready tiles,
with no trigonometry in the loop; every segment folds into one online softmax (softmax is order-free), kept in base 2:
``scale * log2(e)`` is one multiply, ALiBi's bias is the slope times a difference of float positions, ``exp2`` the
exponential. It writes the normalised output and the log-sum-exp (natural log) the backward recomputes from. Query
head ``h`` reads KV head ``h // (H / HKV)`` (GQA, no copies).

Decode (flash-decoding, with FlashAttention-3's GQA packing): the query rows of the heads sharing a KV head form one
tile, so each key tile is read once per KV head; the keys are split across programs over the visible tiles only, each
writing its partial ``(m, l, acc)``, and ``combine_splits_kernel`` merges them exactly (softmax of a union of key sets).

Rows with no visible key have ``l = 0``: their output is 0 and their log-sum-exp -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lce.kernels.attention.launch import launch_options
from lce.kernels.attention.schedule import TileSchedule
from lce.kernels.attention.spec import AttentionSpec
from lce.kernels.attention.triton_common import (
    LOG2E,
    load_tile,
    masked_logits,
    next_power_of_2,
    placeholder,
    segment_table,
    segments_disjoint,
)
from lce.kernels.backend import device_capability, on_device_of


def allocate(shape, dtype, device) -> torch.Tensor:
    """Uninitialised output memory (tests replace this with NaN-filled memory to catch unwritten tiles)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def attention_fwd_kernel(
    Q, K, V, OUT, LSE, M_PART, L_PART, Q_POS, K_POS, KV_FULL, KV_COUNT, KV_INDEX, SEG, SLOPES, BLOCK_MASK,
    B, H, GROUPS, Tq, Tk, D, DV, n_qt, n_kt, n_splits, q_map_stride, k_map_stride,
    qk_scale, window, sink_tokens, mask_block, n_qb, n_kb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    N_SEG: tl.constexpr, DISJOINT: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_BLOCK_MASK: tl.constexpr, PACK_GQA: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    kv_heads = H // GROUPS
    if PACK_GQA:
        # Decode: the query rows of all GROUPS heads that share a KV head form one tile (row r = head g, query t with
        # r = g * Tq + t), so each key/value tile is read once per KV head instead of once per query head.
        b = pid_bh // kv_heads
        hk = pid_bh % kv_heads
        h_first = hk * GROUPS
        rows = tl.arange(0, BLOCK_M)
        row_ok = rows < GROUPS * Tq
        t_rows = rows % Tq
        h = h_first + rows // Tq
    else:
        b = pid_bh // H
        h_first = pid_bh % H
        hk = h_first // GROUPS
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Tq
        t_rows = rows
        h = h_first
    i = tl.load(Q_POS + b * Tq + t_rows, mask=row_ok, other=0)
    i_f = i.to(tl.float32)
    # Q is [B, H, Tq, D] (one such tensor per query position map): the packed rows of consecutive heads are
    # consecutive rows in memory, so both layouts read rows ``rows`` from the first head's base.
    q_base = (b * H + h_first).to(tl.int64) * Tq * D
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    if HAS_ALIBI:  # per row (packed rows belong to different heads), in base 2 like the logits
        slope = tl.load(SLOPES + h + 0 * rows, mask=row_ok, other=0.0)[:, None] * 1.4426950408889634

    kv_base = (b * kv_heads + hk).to(tl.int64) * Tk
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for s in tl.static_range(max(N_SEG, 1)):
        q_slot = tl.load(SEG + s * 6)
        k_slot = tl.load(SEG + s * 6 + 1)
        q = load_tile(Q + q_slot.to(tl.int64) * q_map_stride + q_base, rows, row_ok, offs_d, d_ok, D)
        k_ptr = K + k_slot.to(tl.int64) * k_map_stride + kv_base * D
        list_at = (s * B + b) * n_qt + pid_m  # the lists are [S, B, nQT]
        full = tl.load(KV_FULL + list_at)
        count = tl.load(KV_COUNT + list_at)
        first = 0
        last = count
        if SPLIT:  # flash-decoding: the splits share this segment's visible tiles, not all tiles
            per_split = (count + n_splits - 1) // n_splits
            first = pid_s * per_split
            last = tl.minimum(count, first + per_split)
        index_ptr = KV_INDEX + list_at.to(tl.int64) * n_kt
        # Full tiles: every pair visible and owned by this segment, no mask built.
        for t in range(first, tl.minimum(last, full)):
            kt = tl.load(index_ptr + t).to(tl.int32)
            cols = kt * BLOCK_N + tl.arange(0, BLOCK_N)
            k = load_tile(k_ptr, cols, cols < Tk, offs_d, d_ok, D)
            v = load_tile(V + kv_base * DV, cols, cols < Tk, offs_dv, dv_ok, DV)
            logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            if HAS_ALIBI:
                j = tl.load(K_POS + b * Tk + cols)
                logits += slope * (j.to(tl.float32)[None, :] - i_f[:, None])
            m_new = tl.maximum(m_i, tl.max(logits, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(logits - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        # Partial tiles: the exact per-pair rules.
        for t in range(tl.maximum(first, full), last):
            kt = tl.load(index_ptr + t).to(tl.int32)
            cols = kt * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < Tk
            j = tl.load(K_POS + b * Tk + cols, mask=col_ok, other=0)
            k = load_tile(k_ptr, cols, col_ok, offs_d, d_ok, D)
            v = load_tile(V + kv_base * DV, cols, col_ok, offs_dv, dv_ok, DV)
            logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            if HAS_ALIBI:
                logits += slope * (j.to(tl.float32)[None, :] - i_f[:, None])
            logits = masked_logits(logits, i, j, row_ok, col_ok, SEG, window, sink_tokens, BLOCK_MASK, mask_block,
                                   n_qb, n_kb, s, N_SEG, DISJOINT, HAS_WINDOW, HAS_BLOCK_MASK)
            m_new = tl.maximum(m_i, tl.max(logits, 1))
            # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead keeps exp2() at 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(logits - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

    # LSE and the partial maxima are [B, H, Tq]-ordered: packed row r of KV head hk is entry (b * H + hk * GROUPS)
    # * Tq + r, and an unpacked row of head h is (b * H + h) * Tq + row, the same formula.
    lse_at = (b * H + h_first).to(tl.int64) * Tq + rows
    if SPLIT:
        part = pid_s.to(tl.int64) * B * H * Tq + lse_at  # partials are [splits, B, H, Tq(, Dv)]
        tl.store(M_PART + part, m_i, mask=row_ok)
        tl.store(L_PART + part, l_i, mask=row_ok)
        tl.store(OUT + part[:, None] * DV + offs_dv[None, :], acc, mask=row_ok[:, None] & dv_ok[None, :])
    else:
        alive = l_i > 0
        out = acc / tl.where(alive, l_i, 1.0)[:, None]
        lse = tl.where(alive, (m_i + tl.log2(tl.where(alive, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + lse_at, lse, mask=row_ok)
        # OUT is [B, Tq, H, Dv]: query t of head h sits at ((b * Tq + t) * H + h) * Dv.
        out_rows = (b * Tq + t_rows).to(tl.int64) * H + h
        tl.store(OUT + out_rows[:, None] * DV + offs_dv[None, :], out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def combine_splits_kernel(M_PART, L_PART, ACC, OUT, LSE, rows_total, H, Tq, DV, n_splits,
                          BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Merge the flash-decoding partials of one query row: rescale every split to the common maximum (base 2), add,
    normalise (the softmax of a union of key sets); a split that saw no visible key has m = -inf and weight 0."""
    row = tl.program_id(0)  # (b * H + h) * Tq + t
    splits = tl.arange(0, BLOCK_S)
    s_ok = splits < n_splits
    at = splits.to(tl.int64) * rows_total + row
    m = tl.load(M_PART + at, mask=s_ok, other=float("-inf"))
    l = tl.load(L_PART + at, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    weight = tl.math.exp2(m - m_safe)
    total = tl.sum(weight * l, 0)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    acc = tl.load(ACC + at[:, None] * DV + offs_dv[None, :], mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
    alive = total > 0
    out = tl.sum(weight[:, None] * acc, 0) / tl.where(alive, total, 1.0)
    lse = tl.where(alive, (m_safe + tl.log2(tl.where(alive, total, 1.0))) * 0.6931471805599453, float("-inf"))
    bh = row // Tq
    t = row % Tq
    out_at = ((bh // H).to(tl.int64) * Tq + t) * H + bh % H
    tl.store(OUT + out_at * DV + offs_dv, out.to(OUT.dtype.element_ty), mask=dv_ok)
    tl.store(LSE + row, lse)


def kernel_config(spec: AttentionSpec, q: torch.Tensor, v: torch.Tensor) -> dict:
    """Compile-time switches and tile widths shared by the forward and backward launches."""
    return {
        "BLOCK_D": next_power_of_2(q.shape[-1]),
        "BLOCK_DV": next_power_of_2(v.shape[-1]),
        "N_SEG": len(spec.segments),
        "DISJOINT": segments_disjoint(spec.segments),
        "HAS_ALIBI": spec.alibi_slopes is not None,
        "HAS_WINDOW": spec.window is not None,
        "HAS_BLOCK_MASK": spec.block_mask is not None,
        # fp32 inputs: exact fp32 products (tf32 would lose 13 bits of mantissa); fp16/bf16: tensor cores.
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def spec_arguments(spec: AttentionSpec, q: torch.Tensor) -> dict:
    """The spec's tensors and scalars as kernel arguments (one cached placeholder where a feature is off)."""
    device = q.device
    mask = spec.block_mask
    return {
        "SEG": segment_table(spec, device),
        "SLOPES": (spec.alibi_slopes.to(torch.float32).contiguous() if spec.alibi_slopes is not None
                   else placeholder(torch.float32, device)),
        "BLOCK_MASK": mask.to(torch.int8).contiguous() if mask is not None else placeholder(torch.int8, device),
        "qk_scale": float(spec.scale) * LOG2E,
        "window": spec.window or 0,
        "sink_tokens": spec.sink_tokens,
        "mask_block": spec.block_size or 1,
        "n_qb": mask.shape[0] if mask is not None else 0,
        "n_kb": mask.shape[1] if mask is not None else 0,
    }


def forward_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   m_part: torch.Tensor, l_part: torch.Tensor, spec: AttentionSpec, q_pos: torch.Tensor,
                   k_pos: torch.Tensor, schedule: TileSchedule, n_splits: int, pack_gqa: bool,
                   capability: tuple[int, int] | None,
                   options: dict | None = None) -> tuple[tuple[int, int, int], dict]:
    """The grid and every keyword argument of one ``attention_fwd_kernel`` launch (tensors, scalars, constexprs,
    ``num_warps``/``num_stages``). ``attention_forward`` launches with it and ``lce.kernels.inspect`` compiles with it
    (on meta tensors), so the compile check sees exactly what runs. ``q``/``k`` are the rotated stacks
    ``[NQ, B, H, Tq, D]`` / ``[NK, B, HKV, Tk, D]``; ``options``: warps and stages (a tuning candidate's), else the
    launch table's."""
    _, batch, heads, tq, d = q.shape
    kv_heads, tk, dv = k.shape[2], k.shape[3], v.shape[-1]
    n_qt, n_kt = schedule.kv_count.shape[2], schedule.kv_index.shape[3]
    kwargs = dict(
        Q=q, K=k, V=v, OUT=out, LSE=lse, M_PART=m_part, L_PART=l_part, Q_POS=q_pos, K_POS=k_pos,
        KV_FULL=schedule.kv_full, KV_COUNT=schedule.kv_count, KV_INDEX=schedule.kv_index,
        B=batch, H=heads, GROUPS=heads // kv_heads, Tq=tq, Tk=tk, D=d, DV=dv, n_qt=n_qt, n_kt=n_kt,
        n_splits=n_splits, q_map_stride=q[0].numel(), k_map_stride=k[0].numel(),
        BLOCK_M=schedule.block_m, BLOCK_N=schedule.block_n, PACK_GQA=pack_gqa, SPLIT=n_splits > 1,
        **spec_arguments(spec, q), **kernel_config(spec, q, v),
        **(options or launch_options("decode" if pack_gqa or n_splits > 1 else "forward", q.dtype, max(d, dv),
                                     capability, block_mask=spec.block_mask is not None)),
    )
    return (n_qt, batch * (kv_heads if pack_gqa else heads), n_splits), kwargs


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, q_pos: torch.Tensor,
                      k_pos: torch.Tensor, schedule: TileSchedule, n_splits: int = 1, pack_gqa: bool = False,
                      options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel.

    Args:
        q: ``[NQ, B, H, Tq, D]``, k: ``[NK, B, HKV, Tk, D]`` (rotated once per position map, ``prerotate.py``),
            v: ``[B, HKV, Tk, Dv]``, contiguous, one dtype.
        spec: what to compute (checked by the caller).
        q_pos, k_pos: ``[B, Tq]``, ``[B, Tk]`` int32, contiguous.
        schedule: the tile lists (``build_schedule``) for these positions.
        n_splits: programs sharing the key tiles of one query tile (flash-decoding; > 1 only with one query tile).
        pack_gqa: the query rows of each KV head's group form one tile (decode; needs ``GROUPS * Tq <= block_m``).
        options: ``num_warps``/``num_stages`` (``tuning.TileConfig.options``), else the launch table's.

    Returns:
        ``out [B, Tq, H, Dv]`` in ``q.dtype`` and ``lse [B, H, Tq]`` fp32 (natural log).
    """
    _, batch, heads, tq, _ = q.shape
    dv = v.shape[-1]
    lse = allocate((batch, heads, tq), torch.float32, q.device)
    out = allocate((batch, tq, heads, dv), q.dtype, q.device)
    if n_splits > 1:
        acc_part = allocate((n_splits, batch, heads, tq, dv), torch.float32, q.device)
        m_part = allocate((n_splits, batch, heads, tq), torch.float32, q.device)
        l_part = allocate((n_splits, batch, heads, tq), torch.float32, q.device)
    else:
        acc_part, m_part, l_part = out, lse, lse
    grid, kwargs = forward_launch(q, k, v, acc_part, lse, m_part, l_part, spec, q_pos, k_pos, schedule, n_splits,
                                  pack_gqa, device_capability(q), options)
    with on_device_of(q):
        attention_fwd_kernel[grid](**kwargs)
        if n_splits > 1:
            combine_splits_kernel[(batch * heads * tq,)](
                m_part, l_part, acc_part, out, lse, batch * heads * tq, heads, tq, dv, n_splits,
                BLOCK_S=triton.next_power_of_2(n_splits), BLOCK_DV=next_power_of_2(dv))
    return out, lse
