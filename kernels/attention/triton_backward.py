"""Backward Triton kernels of ``lce.kernels.attention``: FlashAttention-2 (Dao 2023, arXiv:2307.08691,
Algorithm 2) with the probabilities recomputed from the saved log-sum-exp, ``P = exp(S - lse)``, and
``dS = P * (dP - delta)`` where ``dP = dO V^T`` and ``delta = rowsum(dO * O)``.

Two deterministic kernels (no atomics): ``dq`` runs one program per (query tile, batch x head) over the key tiles its
query tile visits; ``dk_dv`` one program per (key tile, batch x KV head) over the query heads of its group and the
query tiles that visit it (the transposed schedule), so GQA gradients are summed in registers.

Positions: a pair owned by segment ``s`` has logit ``scale * (R(a_i) q_i) . (R(b_j) k_j)``, so its gradient reaches
the rotated query as ``dS_s K_s`` and is turned back by the transpose of the rotation, the rotation by ``-a_i``
(and likewise for keys with ``-b_j``); the unrotated rest of the head takes ``dS`` of every segment. Log-n scales
``dq`` by the query's multiplier. ALiBi slopes and positions get no gradient.
"""

from __future__ import annotations

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
    position_map,
    rope,
    segment_possible,
    store_tile,
    tile_scores,
    visible_pairs,
)
from lce.kernels.attention.triton_forward import allocate, kernel_config, spec_arguments
from lce.kernels.backend import device_capability, on_device_of


@triton.jit
def load_queries(Q, q_base, rows, row_ok, i, col1, col2, r_ok, col_rest, rest_ok, D, inv_log_length,
                 HAS_LOGN: tl.constexpr):
    """The three tiles of a query tile, log-n scaled in the input dtype."""
    q1 = load_tile(Q + q_base, rows, row_ok, col1, r_ok, D)
    q2 = load_tile(Q + q_base, rows, row_ok, col2, r_ok, D)
    q_rest = load_tile(Q + q_base, rows, row_ok, col_rest, rest_ok, D)
    if HAS_LOGN:
        mult = logn_multiplier(i, inv_log_length)[:, None]
        q1 = (q1.to(tl.float32) * mult).to(q_rest.dtype)
        q2 = (q2.to(tl.float32) * mult).to(q_rest.dtype)
        q_rest = (q_rest.to(tl.float32) * mult).to(q_rest.dtype)
    return q1, q2, q_rest


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, Q_POS, K_POS, KV_COUNT, KV_INDEX, INV_FREQ, SEG, SLOPES, BLOCK_MASK,
    H, GROUPS, Tq, Tk, D, DV, R2, n_qt, n_kt,
    scale, attention_scaling, inv_log_length, window, sink_tokens, mask_block, n_qb, n_kb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R2: tl.constexpr, BLOCK_REST: tl.constexpr,
    BLOCK_DV: tl.constexpr, N_SEG: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_REST: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_LOGN: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_BLOCK_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUPS

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    i = tl.load(Q_POS + b * Tq + rows, mask=row_ok, other=0)
    i_lo = tl.min(tl.where(row_ok, i, 2147483647))
    i_hi = tl.max(tl.where(row_ok, i, -2147483647))
    col1, col2, r_ok, col_rest, rest_ok = head_columns(R2, D, BLOCK_R2, BLOCK_REST, INTERLEAVED)
    q_base = (pid_bh.to(tl.int64) * Tq) * D
    q1, q2, q_rest = load_queries(Q, q_base, rows, row_ok, i, col1, col2, r_ok, col_rest, rest_ok, D,
                                  inv_log_length, HAS_LOGN)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    do = load_tile(DO + (b.to(tl.int64) * Tq * H + h) * DV, rows, row_ok, offs_dv, dv_ok, H * DV)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * Tq + rows, mask=row_ok, other=0.0)
    # A row without visible keys has lse = -inf and only hidden (-inf) scores: 0 keeps exp() at 0, never NaN.
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Tq + rows, mask=row_ok, other=0.0)
    freq = tl.load(INV_FREQ + tl.arange(0, BLOCK_R2), mask=r_ok, other=0.0)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h)

    kv_base = (b * (H // GROUPS) + hk).to(tl.int64) * Tk
    dq1 = tl.zeros([BLOCK_M, BLOCK_R2], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, BLOCK_R2], dtype=tl.float32)
    dq_rest = tl.zeros([BLOCK_M, BLOCK_REST], dtype=tl.float32)
    count = tl.load(KV_COUNT + b * n_qt + pid_m)
    for t in range(count):
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
        scores, owner = tile_scores(q1, q2, q_rest, k1, k2, k_rest, i, j, visible, i_lo, i_hi, j_lo, j_hi, SEG, freq,
                                    attention_scaling, scale, slope, BLOCK_M, BLOCK_N, N_SEG, HAS_REST, HAS_ALIBI,
                                    DOT_PRECISION)
        p = tl.exp(scores - lse[:, None])  # hidden pairs have score -inf: probability 0
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_REST:
            dq_rest += tl.dot(ds.to(k_rest.dtype), k_rest, input_precision=DOT_PRECISION)
        for s in tl.static_range(N_SEG):
            base = s * 18
            if segment_possible(SEG, base + 14, i_lo, i_hi, j_lo, j_hi):
                ka, kb = rope(k1.to(tl.float32), k2.to(tl.float32), position_map(j, SEG, base + 7), freq,
                              attention_scaling)
                ds_s = tl.where(owner == s, ds, 0.0).to(k1.dtype)
                ga = tl.dot(ds_s, ka.to(k1.dtype), input_precision=DOT_PRECISION)
                gb = tl.dot(ds_s, kb.to(k1.dtype), input_precision=DOT_PRECISION)
                ua, ub = rope(ga, gb, -position_map(i, SEG, base), freq, attention_scaling)
                dq1 += ua
                dq2 += ub

    factor = scale
    if HAS_LOGN:
        factor = scale * logn_multiplier(i, inv_log_length)[:, None]
    dq_base = DQ + q_base
    store_tile(dq_base, (dq_rest * factor).to(DQ.dtype.element_ty), rows, row_ok, col_rest, rest_ok, D)
    if N_SEG > 0:
        store_tile(dq_base, (dq1 * factor).to(DQ.dtype.element_ty), rows, row_ok, col1, r_ok, D)
        store_tile(dq_base, (dq2 * factor).to(DQ.dtype.element_ty), rows, row_ok, col2, r_ok, D)


@triton.jit
def attention_bwd_dk_dv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_OUT, Q_POS, K_POS, Q_COUNT, Q_INDEX, INV_FREQ, SEG, SLOPES, BLOCK_MASK,
    H, GROUPS, Tq, Tk, D, DV, R2, n_qt, n_kt,
    scale, attention_scaling, inv_log_length, window, sink_tokens, mask_block, n_qb, n_kb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R2: tl.constexpr, BLOCK_REST: tl.constexpr,
    BLOCK_DV: tl.constexpr, N_SEG: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_REST: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_LOGN: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_BLOCK_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    kv_heads = H // GROUPS
    b = pid_bhk // kv_heads
    hk = pid_bhk % kv_heads

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Tk
    j = tl.load(K_POS + b * Tk + cols, mask=col_ok, other=0)
    j_lo = tl.min(tl.where(col_ok, j, 2147483647))
    j_hi = tl.max(tl.where(col_ok, j, -2147483647))
    col1, col2, r_ok, col_rest, rest_ok = head_columns(R2, D, BLOCK_R2, BLOCK_REST, INTERLEAVED)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    kv_base = pid_bhk.to(tl.int64) * Tk
    k1 = load_tile(K + kv_base * D, cols, col_ok, col1, r_ok, D)
    k2 = load_tile(K + kv_base * D, cols, col_ok, col2, r_ok, D)
    k_rest = load_tile(K + kv_base * D, cols, col_ok, col_rest, rest_ok, D)
    v = load_tile(V + kv_base * DV, cols, col_ok, offs_dv, dv_ok, DV)
    freq = tl.load(INV_FREQ + tl.arange(0, BLOCK_R2), mask=r_ok, other=0.0)

    dk1 = tl.zeros([BLOCK_N, BLOCK_R2], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, BLOCK_R2], dtype=tl.float32)
    dk_rest = tl.zeros([BLOCK_N, BLOCK_REST], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    count = tl.load(Q_COUNT + b * n_kt + pid_n)
    for g in range(GROUPS):
        h = hk * GROUPS + g
        bh = (b * H + h).to(tl.int64)
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(SLOPES + h)
        for t in range(count):
            qt = tl.load(Q_INDEX + (b * n_kt + pid_n).to(tl.int64) * n_qt + t)
            rows = qt * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < Tq
            i = tl.load(Q_POS + b * Tq + rows, mask=row_ok, other=0)
            i_lo = tl.min(tl.where(row_ok, i, 2147483647))
            i_hi = tl.max(tl.where(row_ok, i, -2147483647))
            q1, q2, q_rest = load_queries(Q, bh * Tq * D, rows, row_ok, i, col1, col2, r_ok, col_rest, rest_ok, D,
                                          inv_log_length, HAS_LOGN)
            do = load_tile(DO + (b.to(tl.int64) * Tq * H + h) * DV, rows, row_ok, offs_dv, dv_ok, H * DV)
            lse = tl.load(LSE + bh * Tq + rows, mask=row_ok, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            delta = tl.load(DELTA + bh * Tq + rows, mask=row_ok, other=0.0)
            visible = visible_pairs(i, j, row_ok, col_ok, window, sink_tokens, BLOCK_MASK, mask_block, n_qb, n_kb,
                                    HAS_WINDOW, HAS_BLOCK_MASK)
            scores, owner = tile_scores(q1, q2, q_rest, k1, k2, k_rest, i, j, visible, i_lo, i_hi, j_lo, j_hi, SEG,
                                        freq, attention_scaling, scale, slope, BLOCK_M, BLOCK_N, N_SEG, HAS_REST,
                                        HAS_ALIBI, DOT_PRECISION)
            p = tl.exp(scores - lse[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            if HAS_REST:
                dk_rest += tl.dot(tl.trans(ds.to(q_rest.dtype)), q_rest, input_precision=DOT_PRECISION)
            for s in tl.static_range(N_SEG):
                base = s * 18
                if segment_possible(SEG, base + 14, i_lo, i_hi, j_lo, j_hi):
                    qa, qb = rope(q1.to(tl.float32), q2.to(tl.float32), position_map(i, SEG, base), freq,
                                  attention_scaling)
                    ds_s = tl.trans(tl.where(owner == s, ds, 0.0).to(q1.dtype))
                    ga = tl.dot(ds_s, qa.to(q1.dtype), input_precision=DOT_PRECISION)
                    gb = tl.dot(ds_s, qb.to(q1.dtype), input_precision=DOT_PRECISION)
                    ua, ub = rope(ga, gb, -position_map(j, SEG, base + 7), freq, attention_scaling)
                    dk1 += ua
                    dk2 += ub

    dk_base = DK + kv_base * D
    store_tile(dk_base, (dk_rest * scale).to(DK.dtype.element_ty), cols, col_ok, col_rest, rest_ok, D)
    if N_SEG > 0:
        store_tile(dk_base, (dk1 * scale).to(DK.dtype.element_ty), cols, col_ok, col1, r_ok, D)
        store_tile(dk_base, (dk2 * scale).to(DK.dtype.element_ty), cols, col_ok, col2, r_ok, D)
    store_tile(DV_OUT + kv_base * DV, dv.to(DV_OUT.dtype.element_ty), cols, col_ok, offs_dv, dv_ok, DV)


def backward_launches(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, lse: torch.Tensor,
                      delta: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, spec: AttentionSpec,
                      q_pos: torch.Tensor, k_pos: torch.Tensor, schedule: TileSchedule,
                      capability: tuple[int, int] | None) -> dict[str, tuple[tuple[int, int], dict]]:
    """``{"dq": (grid, kwargs), "dk_dv": (grid, kwargs)}``: every argument of the two backward launches (tensors,
    scalars, constexprs, ``num_warps``/``num_stages``). ``attention_backward`` launches with them and
    ``lce.kernels.inspect`` compiles with them (on meta tensors), so the compile check sees exactly what runs."""
    batch, heads, tq, d = q.shape
    kv_heads, tk, dv_dim = k.shape[1], k.shape[2], v.shape[-1]
    n_qt, n_kt = schedule.kv_count.shape[1], schedule.kv_index.shape[2]
    common = dict(Q=q, K=k, V=v, DO=grad_out, LSE=lse, DELTA=delta, Q_POS=q_pos, K_POS=k_pos,
                  H=heads, GROUPS=heads // kv_heads, Tq=tq, Tk=tk, D=d, DV=dv_dim, n_qt=n_qt, n_kt=n_kt,
                  BLOCK_M=schedule.block_m, BLOCK_N=schedule.block_n,
                  **spec_arguments(spec, q), **kernel_config(spec, q, v))
    head_dim = max(d, dv_dim)
    return {
        "dq": ((n_qt, batch * heads),
               dict(common, DQ=dq, KV_COUNT=schedule.kv_count, KV_INDEX=schedule.kv_index,
                    **launch_options("backward_dq", q.dtype, head_dim, capability))),
        "dk_dv": ((n_kt, batch * kv_heads),
                  dict(common, DK=dk, DV_OUT=dv, Q_COUNT=schedule.q_count, Q_INDEX=schedule.q_index,
                       **launch_options("backward_dk_dv", q.dtype, head_dim, capability,
                                        logn=spec.logn_length is not None))),
    }


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, spec: AttentionSpec, q_pos: torch.Tensor,
                       k_pos: torch.Tensor,
                       schedule: TileSchedule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``attention_forward``.

    Args:
        grad_out: ``[B, Tq, H, Dv]`` (contiguous), the gradient of ``out``.
        q, k, v, spec, q_pos, k_pos, schedule: as in the forward call.
        out: ``[B, Tq, H, Dv]`` and lse ``[B, H, Tq]``: what the forward returned.

    Returns:
        ``dq [B, H, Tq, D]``, ``dk [B, HKV, Tk, D]``, ``dv [B, HKV, Tk, Dv]`` in the inputs' dtype.
    """
    delta = (grad_out.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, Tq]
    dq = allocate(q.shape, q.dtype, q.device)
    dk = allocate(k.shape, k.dtype, k.device)
    dv = allocate(v.shape, v.dtype, v.device)
    launches = backward_launches(q, k, v, grad_out, lse, delta, dq, dk, dv, spec, q_pos, k_pos, schedule,
                                 device_capability(q))
    with on_device_of(q):
        grid, kwargs = launches["dq"]
        attention_bwd_dq_kernel[grid](**kwargs)
        grid, kwargs = launches["dk_dv"]
        attention_bwd_dk_dv_kernel[grid](**kwargs)
    return dq, dk, dv
