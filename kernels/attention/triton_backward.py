"""Backward Triton kernels of ``lce.kernels.attention``: FlashAttention-2 (Dao 2023, arXiv:2307.08691,
Algorithm 2) with the probabilities recomputed from the saved log-sum-exp, ``P = exp(S - lse)``, and
``dS = P * (dP - delta)`` where ``dP = dO V^T`` and ``delta = rowsum(dO * O)`` (one small pre-kernel).

Two deterministic kernels (no atomics), each with one program per segment on the grid's third axis: ``dq`` runs one
program per (query tile, batch x head) over the key tiles its query tile visits for that segment (full tiles without a
mask first); ``dk_dv`` one program per (key tile, batch x KV head) over the query heads of its group and the query
tiles that visit it (the transposed schedule), so GQA gradients are summed in registers.

Positions: queries and keys arrive rotated once per position map (``prerotate.py``); a pair owned by segment ``s``
has logit ``scale * (R(a_i) q_i) . (R(b_j) k_j)``, so the kernels write the gradient of segment ``s``'s rotated
queries and keys into slot ``s`` (fp32), and ``prerotate.unrotated_gradient`` turns each back with the transposed
rotation, ``R(-a_i)``, once per distinct map; ``dv`` slots are summed. Without segments the kernels write ``dq``,
``dk``, ``dv`` directly. Queries arrive log-n scaled (``prerotate.py``), so only ``dq`` takes the multiplier (chain
rule). ALiBi slopes and positions get no gradient.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lce.kernels.attention.launch import dk_dv_parts, launch_options
from lce.kernels.attention.schedule import TileSchedule
from lce.kernels.attention.spec import AttentionSpec
from lce.kernels.attention.triton_common import (
    load_tile,
    logn_multiplier,
    masked_logits,
    next_power_of_2,
    store_tile,
)
from lce.kernels.attention.triton_forward import allocate, kernel_config, spec_arguments
from lce.kernels.backend import device_capability, on_device_of


@triton.jit
def attention_bwd_delta_kernel(OUT, DO, DELTA, H, Tq, DV, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """``delta = rowsum(dO * O)`` ``[B, H, Tq]`` fp32 from ``O``, ``dO`` ``[B, Tq, H, Dv]``: one pass, no
    temporaries."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    base = (b.to(tl.int64) * Tq * H + h) * DV
    o = load_tile(OUT + base, rows, row_ok, offs_dv, dv_ok, H * DV).to(tl.float32)
    do = load_tile(DO + base, rows, row_ok, offs_dv, dv_ok, H * DV).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * Tq + rows, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, Q_POS, K_POS, KV_FULL, KV_COUNT, KV_INDEX, SEG, SLOPES, BLOCK_MASK,
    B, H, GROUPS, Tq, Tk, D, DV, n_qt, n_kt, q_map_stride, k_map_stride, dq_slot_stride,
    qk_scale, inv_log_length, window, sink_tokens, mask_block, n_qb, n_kb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    N_SEG: tl.constexpr, DISJOINT: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_LOGN: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_BLOCK_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    s = tl.program_id(2)  # the segment: each program computes one segment's gradient slot
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUPS

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    i = tl.load(Q_POS + b * Tq + rows, mask=row_ok, other=0)
    i_f = i.to(tl.float32)
    q_base = pid_bh.to(tl.int64) * Tq * D
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    q_slot = tl.load(SEG + s * 6)
    k_slot = tl.load(SEG + s * 6 + 1)
    q = load_tile(Q + q_slot.to(tl.int64) * q_map_stride + q_base, rows, row_ok, offs_d, d_ok, D)
    factor = qk_scale * 0.6931471805599453  # the softmax scale (qk_scale is in base 2)
    if HAS_LOGN:  # queries arrive log-n scaled (prerotate.py): the chain rule's factor
        factor = factor * logn_multiplier(i, inv_log_length)[:, None]
    do = load_tile(DO + (b.to(tl.int64) * Tq * H + h) * DV, rows, row_ok, offs_dv, dv_ok, H * DV)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * Tq + rows, mask=row_ok, other=0.0)
    # A row without visible keys has lse = -inf and only hidden (-inf) scores: 0 keeps exp2() at 0, never NaN.
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)[:, None]
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Tq + rows, mask=row_ok, other=0.0)[:, None]
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h) * 1.4426950408889634

    kv_base = (b * (H // GROUPS) + hk).to(tl.int64) * Tk
    k_ptr = K + k_slot.to(tl.int64) * k_map_stride + kv_base * D
    list_at = (s * B + b) * n_qt + pid_m
    full = tl.load(KV_FULL + list_at)
    count = tl.load(KV_COUNT + list_at)
    index_ptr = KV_INDEX + list_at.to(tl.int64) * n_kt
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Full tiles: every pair visible and owned by this segment, no mask built.
    for t in range(full):
        kt = tl.load(index_ptr + t).to(tl.int32)
        cols = kt * BLOCK_N + tl.arange(0, BLOCK_N)
        k = load_tile(k_ptr, cols, cols < Tk, offs_d, d_ok, D)
        v = load_tile(V + kv_base * DV, cols, cols < Tk, offs_dv, dv_ok, DV)
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_ALIBI:
            j = tl.load(K_POS + b * Tk + cols)
            logits += slope * (j.to(tl.float32)[None, :] - i_f[:, None])
        p = tl.math.exp2(logits - lse2)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    # Partial tiles: the exact per-pair rules.
    for t in range(full, count):
        kt = tl.load(index_ptr + t).to(tl.int32)
        cols = kt * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < Tk
        j = tl.load(K_POS + b * Tk + cols, mask=col_ok, other=0)
        k = load_tile(k_ptr, cols, col_ok, offs_d, d_ok, D)
        v = load_tile(V + kv_base * DV, cols, col_ok, offs_dv, dv_ok, DV)
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_ALIBI:
            logits += slope * (j.to(tl.float32)[None, :] - i_f[:, None])
        logits = masked_logits(logits, i, j, row_ok, col_ok, SEG, window, sink_tokens, BLOCK_MASK, mask_block, n_qb,
                               n_kb, s, N_SEG, DISJOINT, HAS_WINDOW, HAS_BLOCK_MASK)
        p = tl.math.exp2(logits - lse2)  # hidden pairs have logit -inf: probability 0
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    # Without segments this is dq itself; with them, the gradient of segment s's rotated queries (fp32, turned back
    # and summed by ``prerotate.unrotated_gradient``).
    store_tile(DQ + s.to(tl.int64) * dq_slot_stride + q_base, (dq * factor).to(DQ.dtype.element_ty), rows, row_ok,
               offs_d, d_ok, D)


@triton.jit
def dk_dv_tile(dk, dv, k, v, j, j_f, col_ok, qt, q_ptr, do_ptr, bh, b, s, slope, Q_POS, LSE, DELTA, SEG, BLOCK_MASK,
               H, Tq, D, DV, qk_scale, window, sink_tokens, mask_block, n_qb, n_kb, offs_d, d_ok, offs_dv, dv_ok,
               BLOCK_M: tl.constexpr, N_SEG: tl.constexpr, DISJOINT: tl.constexpr, HAS_ALIBI: tl.constexpr,
               HAS_WINDOW: tl.constexpr, HAS_BLOCK_MASK: tl.constexpr, PARTS: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """One query tile's contribution to a key tile's ``dk`` (segment ``s``'s rotated keys; ``PARTS & 1``) and ``dv``
    (``PARTS & 2``), the exact per-pair rules applied."""
    rows = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Tq
    i = tl.load(Q_POS + b * Tq + rows, mask=row_ok, other=0)
    q = load_tile(q_ptr, rows, row_ok, offs_d, d_ok, D)
    do = load_tile(do_ptr, rows, row_ok, offs_dv, dv_ok, H * DV)
    lse = tl.load(LSE + bh * Tq + rows, mask=row_ok, other=0.0)
    # A row without visible keys has lse = -inf and only hidden (-inf) scores: 0 keeps exp2() at 0, never NaN.
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(DELTA + bh * Tq + rows, mask=row_ok, other=0.0)
    # Transposed tile [N, M] (keys x queries): dv and dk are sums over queries, so p needs no transpose.
    logits_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
    if HAS_ALIBI:
        logits_t += slope * (j_f[:, None] - i.to(tl.float32)[None, :])
    logits_t = tl.trans(masked_logits(tl.trans(logits_t), i, j, row_ok, col_ok, SEG, window, sink_tokens, BLOCK_MASK,
                                      mask_block, n_qb, n_kb, s, N_SEG, DISJOINT, HAS_WINDOW, HAS_BLOCK_MASK))
    p_t = tl.math.exp2(logits_t - lse2[None, :])
    if PARTS & 2:
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    if PARTS & 1:
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def attention_bwd_dk_dv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_OUT, Q_POS, K_POS, Q_COUNT, Q_INDEX, SEG, SLOPES, BLOCK_MASK,
    B, H, GROUPS, Tq, Tk, D, DV, n_qt, n_kt, q_map_stride, k_map_stride, dk_slot_stride, dv_slot_stride,
    qk_scale, window, sink_tokens, mask_block, n_qb, n_kb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    N_SEG: tl.constexpr, DISJOINT: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_BLOCK_MASK: tl.constexpr, PARTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    s = tl.program_id(2)  # the segment: each program computes one segment's dk slot and its part of dv
    kv_heads = H // GROUPS
    b = pid_bhk // kv_heads
    hk = pid_bhk % kv_heads

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Tk
    j = tl.load(K_POS + b * Tk + cols, mask=col_ok, other=0)
    j_f = j.to(tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    kv_base = pid_bhk.to(tl.int64) * Tk
    q_slot = tl.load(SEG + s * 6)
    k_slot = tl.load(SEG + s * 6 + 1)
    k = load_tile(K + k_slot.to(tl.int64) * k_map_stride + kv_base * D, cols, col_ok, offs_d, d_ok, D)
    v = load_tile(V + kv_base * DV, cols, col_ok, offs_dv, dv_ok, DV)
    list_at = (s * B + b) * n_kt + pid_n
    count = tl.load(Q_COUNT + list_at)
    index_ptr = Q_INDEX + list_at.to(tl.int64) * n_qt
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(GROUPS):
        h = hk * GROUPS + g
        bh = (b * H + h).to(tl.int64)
        q_ptr = Q + q_slot.to(tl.int64) * q_map_stride + bh * Tq * D
        do_ptr = DO + (b.to(tl.int64) * Tq * H + h) * DV
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(SLOPES + h) * 1.4426950408889634
        # One loop, every tile masked: splitting off the full tiles as the forward and dq kernels do (two loops,
        # or a branch) made ptxas spill here (48-152 B at head dim 128, Triton 3.9), and the mask is cheap next to
        # the four tile products of a backward step.
        for t in range(count):
            dk, dv = dk_dv_tile(dk, dv, k, v, j, j_f, col_ok, tl.load(index_ptr + t).to(tl.int32), q_ptr, do_ptr,
                                bh, b, s, slope, Q_POS, LSE, DELTA, SEG, BLOCK_MASK, H, Tq, D, DV, qk_scale, window,
                                sink_tokens, mask_block, n_qb, n_kb, offs_d, d_ok, offs_dv, dv_ok, BLOCK_M, N_SEG,
                                DISJOINT, HAS_ALIBI, HAS_WINDOW, HAS_BLOCK_MASK, PARTS, DOT_PRECISION)
    # Without segments dk and dv themselves; with them, segment s's slots (fp32; the caller turns dk back and sums).
    if PARTS & 1:
        store_tile(DK + s.to(tl.int64) * dk_slot_stride + kv_base * D,
                   (dk * (qk_scale * 0.6931471805599453)).to(DK.dtype.element_ty), cols, col_ok, offs_d, d_ok, D)
    if PARTS & 2:
        store_tile(DV_OUT + s.to(tl.int64) * dv_slot_stride + kv_base * DV, dv.to(DV_OUT.dtype.element_ty), cols,
                   col_ok, offs_dv, dv_ok, DV)


def backward_launches(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, lse: torch.Tensor,
                      delta: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, spec: AttentionSpec,
                      q_pos: torch.Tensor, k_pos: torch.Tensor, dq_lists: TileSchedule, dk_dv_lists: TileSchedule,
                      capability: tuple[int, int] | None) -> dict[str, tuple[tuple[int, int], dict]]:
    """``{"dq": (grid, kwargs), "dk_dv": (grid, kwargs)}`` (``"dk"`` and ``"dv"`` apart at head dim 256,
    ``launch.dk_dv_parts``): every argument of the backward launches (tensors,
    scalars, constexprs, ``num_warps``/``num_stages``). ``attention_backward`` launches with them and
    ``lce.kernels.inspect`` compiles with them (on meta tensors), so the compile check sees exactly what runs.
    ``q``/``k`` are the rotated stacks ``[NQ, B, H, Tq, D]`` / ``[NK, B, HKV, Tk, D]``; ``dq``/``dk``/``dv`` hold one
    slot per segment (``[max(1, N_SEG), ...]``), written by the programs of that segment (the grid's third axis).
    ``dq_lists``: the schedule whose key lists the dq kernel walks; ``dk_dv_lists``: the one whose query lists the
    dk/dv kernel walks (``launch.backward_tiles``: its query tiles are smaller)."""
    _, batch, heads, tq, d = q.shape
    kv_heads, tk, dv_dim = k.shape[2], k.shape[3], v.shape[-1]
    common = dict(Q=q, K=k, V=v, DO=grad_out, LSE=lse, DELTA=delta, Q_POS=q_pos, K_POS=k_pos,
                  B=batch, H=heads, GROUPS=heads // kv_heads, Tq=tq, Tk=tk, D=d, DV=dv_dim,
                  q_map_stride=q[0].numel(), k_map_stride=k[0].numel(),
                  **spec_arguments(spec, q), **kernel_config(spec, q, v))
    head_dim = max(d, dv_dim)
    slots = max(1, len(spec.segments))
    dq_qt, dq_kt = dq_lists.kv_count.shape[2], dq_lists.kv_index.shape[3]
    dkdv_kt, dkdv_qt = dk_dv_lists.q_count.shape[2], dk_dv_lists.q_index.shape[3]
    return {
        "dq": ((dq_qt, batch * heads, slots),
               dict(common, DQ=dq, KV_FULL=dq_lists.kv_full, KV_COUNT=dq_lists.kv_count, KV_INDEX=dq_lists.kv_index,
                    n_qt=dq_qt, n_kt=dq_kt, BLOCK_M=dq_lists.block_m, BLOCK_N=dq_lists.block_n,
                    dq_slot_stride=dq[0].numel(), HAS_LOGN=spec.logn_length is not None,
                    inv_log_length=1.0 / math.log(spec.logn_length) if spec.logn_length is not None else 0.0,
                    **launch_options("backward_dq", q.dtype, head_dim, capability,
                                     block_mask=spec.block_mask is not None))),
        **{name: ((dkdv_kt, batch * kv_heads, slots),
                  dict(common, DK=dk, DV_OUT=dv, Q_COUNT=dk_dv_lists.q_count, Q_INDEX=dk_dv_lists.q_index,
                       n_qt=dkdv_qt, n_kt=dkdv_kt, BLOCK_M=dk_dv_lists.block_m, BLOCK_N=dk_dv_lists.block_n,
                       dk_slot_stride=dk[0].numel(), dv_slot_stride=dv[0].numel(), PARTS=parts,
                       **launch_options("backward_dk_dv", q.dtype, head_dim, capability)))
           for name, parts in dk_dv_parts(head_dim).items()},
    }


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, spec: AttentionSpec, q_pos: torch.Tensor,
                       k_pos: torch.Tensor, dq_lists: TileSchedule,
                       dk_dv_lists: TileSchedule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``attention_forward``.

    Args:
        grad_out: ``[B, Tq, H, Dv]`` (contiguous), the gradient of ``out``.
        q, k: the rotated stacks of the forward call; v, spec, q_pos, k_pos: as in the forward call.
        out: ``[B, Tq, H, Dv]`` and lse ``[B, H, Tq]``: what the forward returned.
        dq_lists, dk_dv_lists: the schedules of the two kernels (``backward_launches``).

    Returns:
        Without segments ``dq [B, H, Tq, D]``, ``dk [B, HKV, Tk, D]`` in the inputs' dtype; with segments the fp32
        gradients of each segment's rotated queries and keys ``[N_SEG, B, H, Tq, D]``, ``[N_SEG, B, HKV, Tk, D]``
        (``prerotate.unrotated_gradient`` turns them back); and ``dv [B, HKV, Tk, Dv]``.
    """
    _, batch, heads, tq, _ = q.shape
    dv_dim = v.shape[-1]
    delta = allocate((batch, heads, tq), torch.float32, q.device)
    slots = max(1, len(spec.segments))
    grad_dtype = torch.float32 if spec.segments else q.dtype
    dq = allocate((slots, *q.shape[1:]), grad_dtype, q.device)
    dk = allocate((slots, *k.shape[1:]), grad_dtype, k.device)
    dv = allocate((slots, *v.shape), grad_dtype, v.device)
    launches = backward_launches(q, k, v, grad_out, lse, delta, dq, dk, dv, spec, q_pos, k_pos, dq_lists,
                                 dk_dv_lists, device_capability(q))
    with on_device_of(q):
        block = 64
        attention_bwd_delta_kernel[(triton.cdiv(tq, block), batch * heads)](
            out, grad_out, delta, heads, tq, dv_dim, BLOCK_M=block, BLOCK_DV=next_power_of_2(dv_dim))
        grid, kwargs = launches.pop("dq")
        attention_bwd_dq_kernel[grid](**kwargs)
        for grid, kwargs in launches.values():  # dk and dv together, or apart at head dim 256
            attention_bwd_dk_dv_kernel[grid](**kwargs)
    if not spec.segments:
        return dq[0], dk[0], dv[0]
    return dq, dk, dv.sum(0).to(v.dtype)
