"""A key-block-major Triton forward and dq kernel of ``lce.kernels.selected_attention`` (``reference.py`` defines the
op), for selections per query head (MoBA, Quest-style top-k) and any power-of-two block from 16 to 4096 keys.

Layout as ``triton_selected.py``: contiguous ``q [B, HQ, Tq, D]``, ``k, v [B, HKV, Tk, D]``, ``block_index
[B, HS, Tq, N]`` (``-1`` = empty slot, ``HS`` = ``HQ`` or ``HKV``), ``q_pos [B, Tq]``; key ``j`` sits at position
``j``, block ``b`` holds keys ``b * BS`` to ``b * BS + BS - 1``.

Why: ``triton_selected.selected_fwd_kernel`` runs one program per (token, selection head) whose query tile is the
``G = HQ / HS`` heads sharing the selection, padded to 16 rows. With a selection per query head (``G = 1``: MoBA, Lu
et al. 2025, arXiv:2502.13189; Quest) that tile holds one useful row, so every selected block's keys and values are
read from memory for a single query: the kernel is memory-bound and cannot beat dense FlashAttention-2. NSA's
selection is shared by a GQA group precisely to fill that tile (Yuan et al. 2025, arXiv:2502.11089, section 3.4);
MoBA instead turns the schedule around and runs varlen FlashAttention per key block over the queries that chose it
(its ``moba_attn_varlen``). This file does the latter in one kernel.

Schedule:

1. The selection is turned around (``triton_selected.invert_selection`` on the ``(row, slot)`` pairs, ``pair_lists``):
   per (batch, KV head, key block) the ascending list of pairs ``((b * HS + hs) * Tq + t) * N + n`` that selected the
   block and see one of its keys (``-1`` slots, blocks after ``q_pos`` and past the keys are dropped). Every list is
   cut into tiles of ``BLOCK_R / GP`` pairs (``GP``: ``G`` rounded up to a power of two), flattened into one work list
   (``row_tiles``) so the grid holds only non-empty tiles.
2. ``block_major_fwd_kernel``: one program per tile: it gathers the ``BLOCK_R`` query rows (listed pairs x ``G``
   heads; with ``G = 1`` ``BLOCK_R`` tokens of one KV group's heads: a full tensor-core tile), walks the block's keys in
   sub-tiles of ``BLOCK_K`` with an online softmax, and stores each pair's partial output ``o_part`` (normalised,
   fp32) and partial log-sum-exp ``lse_part`` (fp32, natural log) at the pair's own place in ``O_PART [B, HQ, Tq, N,
   D]`` and ``LSE_PART [B, HQ, Tq, N]``: no scatter, no atomics, deterministic. Pairs no program visits keep the
   initial ``o = 0``, ``lse = -inf``. Sub-tiles entirely at or before every row's position run without a mask; only
   those that reach past some row's position (or past the keys) are masked, and the keys after the tile's last
   position are not read.
3. ``merge_partials`` (PyTorch, ``O(B HQ Tq N D)``): ``lse = logsumexp_n lse_n``, ``o = Σ_n exp(lse_n - lse) o_n``
   (FlashAttention's merge of partial softmaxes); a row with no visible key (``lse = -inf``) gets 0. The same merge
   as one Triton kernel that reads each visited partial once (``merge_partials_fused``) is the alternative ``MERGE``
   names.

Backward (``block_major_backward``): FlashAttention-2's gradients (Dao 2023, arXiv:2307.08691, Algorithm 2) from the
merged ``out`` and ``lse`` (the row's final log-sum-exp, so ``P = exp(S * scale - lse)`` needs no merge), with
``delta = rowsum(dO * O)`` ``[B, HQ, Tq]`` computed once in PyTorch (fp32). Two deterministic launches, no atomics:

- ``block_major_bwd_dq_kernel``: the forward's schedule (the same pair lists and row tiles, the block walked in
  ``BLOCK_K``-key sub-tiles, the mask only where a sub-tile reaches past some row's position), so with ``G = 1`` its
  tiles are full where ``triton_selected.selected_bwd_dq_kernel``'s 16-row tile holds one useful row. Per sub-tile
  ``P = exp(S - lse)``, ``dP = dO V^T``, ``dS = P (dP - delta)``; each pair's ``scale * dS K`` over its block is
  stored at the pair's own place in ``DQ_PART [B, HQ, Tq, N, D]`` (fp32, zero-filled: pairs no program visits add
  0), and ``dq = DQ_PART.sum(-2)`` in PyTorch, rounded to ``q``'s dtype once. Any block size: no split.
- ``triton_selected.selected_bwd_dk_dv_kernel`` (one program per key block over the rows that selected it; the pair
  lists give its row lists, ``pair // N``). It takes blocks up to 128 keys; a larger block is handed to it as
  ``block_size / 128`` consecutive 128-key blocks (``split_blocks``, inverted once more): the same keys, so the same
  gradients.

The rows must not list a block twice (the op drops repeats first: ``reference.drop_repeated_blocks``).

Precision: as ``triton_selected.py``: every ``tl.dot`` accumulates in fp32; bf16/fp16 operands on tensor cores with
the probabilities (and the backward's ``dS``) rounded to the input dtype before the next product; fp32 inputs use
exact IEEE dots (not TF32). The softmax runs in fp32 with ``exp2`` (``scale * log2(e)`` folded into one multiply).
Partials, the merge and dq's sum over the slots are fp32; the output and dq are rounded to ``q``'s dtype once, at
the end.

Sizes: ``block_size`` a power of two from 16 to 4096 (``BLOCK_SIZES``); ``BLOCK_K`` the sub-tile (``LAUNCH_TABLE``,
``DQ_LAUNCH_TABLE``, at most the block); head dims up to 256. Memory: the forward's partials take ``B * HQ * Tq * N
* (D + 1) * 4`` bytes (``2N`` times a bf16 output), the backward's ``DQ_PART`` ``B * HQ * Tq * N * D * 4``, the pair
lists ``O(B HS Tq N)`` int32 (rebuilt by the backward, not saved). Offsets are int32 unless a tensor holds ``2^31``
elements or more (then int64; the dq kernel stores to ``DQ_PART`` with int64 offsets always); the pairs must number
fewer than ``2^31`` (they are int32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lce.errors import LceError
from lce.kernels.backend import on_device_of
from lce.kernels.selected_attention import triton_selected as ts
from lce.kernels.triton_precision import dot as _dot
from lce.kernels.triton_precision import round_to as _to

#: Block sizes the key-block-major forward takes (a block is walked in ``BLOCK_K``-key sub-tiles, so it may exceed
#: ``triton_selected.BLOCK_SIZES``: MoBA's paper uses 512-key blocks, its repository defaults to 2048).
BLOCK_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Largest block ``triton_selected``'s dk/dv kernel takes; larger blocks are split into blocks of this size for it.
BACKWARD_BLOCK = max(ts.BLOCK_SIZES)

#: ``(head-dim tile, fp32?) -> (BLOCK_R, BLOCK_K, num_warps, num_stages)`` on a GPU, chosen with the compile check
#: (sm_90, Triton 3.9, block 512, 16 slots; ``lce.kernels.inspect``): no spills, bf16/fp16 dots on wgmma (HGMMA).
#: bf16/fp16: 128 rows x 32 keys at head dim 64 with 4 warps, 3 stages (160-162 registers, 40 KB shared, 3 blocks
#: per SM; 128 x 64 with int64 offsets: 239-242, 64 KB, 2 blocks) and at 128 with 8 warps, 2 stages (195-206
#: registers, 64 KB; 128 x 64, 3 stages: 222-228, 128 KB); at 256 64 x 32 with 8 warps, 2 stages (246 registers,
#: 96 KB; 64 x 64 spilled 32-636 B at 1-2 stages and 4-8 warps, 128 x 32 376-988 B). fp32 (IEEE dots, no tensor
#: cores: the exactness path): 64 x 32 tiles spilled ~2 KB, so 32 rows x 32 keys at 4 warps (d64: 168 registers)
#: and 32 x 16 at 8 warps (d128: 79, d256: 180 registers), no spills. ``BLOCK_K`` is capped by the block size. Not
#: yet timed on a GPU.
LAUNCH_TABLE: dict[tuple[int, bool], tuple[int, int, int, int]] = {
    (16, False): (128, 32, 4, 3),
    (32, False): (128, 32, 4, 3),
    (64, False): (128, 32, 4, 3),
    (128, False): (128, 32, 8, 2),
    (256, False): (64, 32, 8, 2),
    (16, True): (32, 32, 4, 1),
    (32, True): (32, 32, 4, 1),
    (64, True): (32, 32, 4, 1),
    (128, True): (32, 16, 8, 1),
    (256, True): (32, 16, 8, 1),
}
#: ``(head-dim tile, fp32?) -> (BLOCK_R, BLOCK_K, num_warps, num_stages)`` of ``block_major_bwd_dq_kernel``, chosen
#: as ``LAUNCH_TABLE`` (sm_90, Triton 3.9, blocks 64 and 512, 16 slots, both layouts): no spills, bf16/fp16 dots on
#: wgmma. The dq kernel holds ``q``, ``dO`` and the fp32 ``dq`` through the loop and two ``[BLOCK_R, BLOCK_K]`` fp32
#: tiles (``S``, ``dP``) per sub-tile, so its key sub-tiles are narrower than the forward's (32, as the Triton
#: tutorial's dq): bf16/fp16 128 x 32 at head dim 64 with 4 warps, 3 stages (193 registers, 56 KB, 2 blocks per SM;
#: 128 x 64: 241) and at 128 with 8 warps, 2 stages (182-186 registers, 96 KB; 128 x 64: 235, and on sm_80 128 x 64
#: spilled 88-132 B where 128 x 32 does not); at 256 64 x 32 with 8 warps, 2 stages (246 registers, 128 KB; 1 stage
#: spilled 88 B, 64 x 64 196 B, 128 x 32 0.9-1.2 KB, 4 warps ~1 KB). fp32 (IEEE dots): 32 x 32 at 4 warps for head
#: dim 64 (218 registers), 16 x 32 at 128 (4 warps, 109) and 256 (8 warps, 110), no spills (32 x 16 spilled 24-48
#: B at 128-256). ``BLOCK_K`` is capped by the block size. Not yet timed on a GPU.
DQ_LAUNCH_TABLE: dict[tuple[int, bool], tuple[int, int, int, int]] = {
    (16, False): (128, 32, 4, 3),
    (32, False): (128, 32, 4, 3),
    (64, False): (128, 32, 4, 3),
    (128, False): (128, 32, 8, 2),
    (256, False): (64, 32, 8, 2),
    (16, True): (32, 32, 4, 1),
    (32, True): (32, 32, 4, 1),
    (64, True): (32, 32, 4, 1),
    (128, True): (16, 32, 4, 1),
    (256, True): (16, 32, 8, 1),
}
#: How the partials are merged: ``"torch"`` (``merge_partials``: a zero fill, an in-place product and a sum, about
#: four passes over the ``B * HQ * Tq * N * D`` fp32 partials besides the kernel's write) or ``"triton"``
#: (``merge_partials_fused``: one read of the visited partials). Both are tested; which is faster is for a GPU to say.
MERGE = "torch"
#: In Triton's interpreter (CPU tensors: the tests) small tiles, so tiny cases still span several row tiles and
#: key sub-tiles.
INTERPRETER_TILES = (16, 16)

_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(ts.LOG2E)


@triton.jit
def _tile(TILES, PAIRS, Q_POS, HQ, HKV, HS, Tq, Tk, N, D, n_blocks, BS: tl.constexpr, BLOCK_R: tl.constexpr,
          BLOCK_K: tl.constexpr, GP: tl.constexpr, BLOCK_D: tl.constexpr, INT64: tl.constexpr):
    """This program's row tile over its key block, shared by the forward and dq kernels: per row the flat (batch,
    query head) ``heads``, token ``t``, slot ``n``, mask ``row_ok``, ``q``-row offset ``q_rows`` and last visible key
    ``last``; the head-dim columns and their mask; the K/V row offset of the block's (batch, KV head) ``kv_rows``;
    the keys to walk, ``start .. stop``, of which ``start .. unmasked_end`` need no mask. Row ``r`` of the tile is
    head ``r % GP`` of the group of listed pair ``first + r // GP``."""
    tile = tl.program_id(0)
    lst = tl.load(TILES + tile * 3)
    first = tl.load(TILES + tile * 3 + 1)
    end = tl.load(TILES + tile * 3 + 2)
    if INT64:
        lst, first, end = lst.to(tl.int64), first.to(tl.int64), end.to(tl.int64)
    group = HQ // HS
    kb = lst % n_blocks
    bkv = lst // n_blocks
    b = bkv // HKV
    r = tl.arange(0, BLOCK_R)
    entry = first + r // GP
    g = r % GP
    row_ok = (entry < end) & (g < group)
    pair = tl.load(PAIRS + entry, mask=row_ok, other=0)  # ((b * HS + hs) * Tq + t) * N + n
    if INT64:
        pair = pair.to(tl.int64)
    n = pair % N
    t = (pair // N) % Tq
    hs = (pair // (N * Tq)) % HS
    heads = b * HQ + hs * group + g  # [BLOCK_R] flat (batch, query head)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    q_rows = (heads * Tq + t) * D
    # The last key each row sees (its position, at most the last key). Padding rows take the tile's last: they never
    # widen the keys read nor force a mask, and their softmax stays finite (they are not stored).
    last = tl.minimum(tl.load(Q_POS + b * Tq + t, mask=row_ok, other=-1).to(tl.int32), Tk - 1)
    tile_last = tl.max(last, 0)
    last = tl.where(row_ok, last, tile_last)
    min_last = tl.min(last, 0)
    start = kb * BS
    stop = tl.minimum(start + BS, tile_last + 1)  # keys after every row's position are not read
    # Sub-tiles wholly at or before every row's position need no mask (min_last >= start: each listed pair sees the
    # block's first key).
    unmasked_end = tl.minimum(start + (min_last + 1 - start) // BLOCK_K * BLOCK_K, stop)
    return heads, t, n, row_ok, cols, col_ok, q_rows, bkv * Tk, last, tile_last, start, unmasked_end, stop


@triton.jit
def _attend_keys(acc, m_i, l_i, q, K, V, kv_rows, ks, last, tile_last, cols, col_ok, qk_scale, D,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, MASK: tl.constexpr):
    """One online-softmax step of the ``[BLOCK_R]`` rows over keys ``ks .. ks + BLOCK_K - 1``: the updated ``(acc,
    m_i, l_i)`` (``m_i`` in log2 units). ``MASK``: the sub-tile reaches past some row's ``last`` (or past the tile's
    last key): mask the scores per row and the loads to keys ``<= tile_last``."""
    keys = ks + tl.arange(0, BLOCK_K)
    kv = (kv_rows + keys) * D
    if MASK:
        kv_mask = (keys <= tile_last)[:, None] & col_ok[None, :]
    else:
        kv_mask = col_ok[None, :]  # broadcast over the keys by tl.load
    k = tl.load(K + kv[:, None] + cols[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + kv[:, None] + cols[None, :], mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_R, BLOCK_K], tl.float32)) * qk_scale
    if MASK:
        s = tl.where(keys[None, :] <= last[:, None], s, float("-inf"))
    # Finite: every row sees the block's first key (``invert_selection`` lists only such pairs; padding rows take the
    # tile's last position), and the first sub-tile starts there, so no row meets -inf - -inf.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(_to(p, v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def block_major_fwd_kernel(
    Q, K, V, Q_POS, PAIRS, TILES, O_PART, LSE_PART, qk_scale,
    HQ, HKV, HS, Tq, Tk, N, D, n_blocks,
    BS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, GP: tl.constexpr, BLOCK_D: tl.constexpr,
    INT64: tl.constexpr,
):
    """``O_PART [B, HQ, Tq, N, D]`` and ``LSE_PART [B, HQ, Tq, N]`` (fp32) of the pairs of one row tile over one key
    block. ``TILES [num_tiles, 3]`` int32: (list ``(b * HKV + kv head) * n_blocks + block``, first entry, end entry)
    into ``PAIRS`` (``pair_lists``); grid ``(num_tiles,)``; ``qk_scale = scale * log2(e)``. Row ``r`` of the tile is
    head ``r % GP`` of the group of listed pair ``first + r // GP``."""
    heads, t, n, row_ok, cols, col_ok, q_rows, kv_rows, last, tile_last, start, unmasked_end, stop = _tile(
        TILES, PAIRS, Q_POS, HQ, HKV, HS, Tq, Tk, N, D, n_blocks, BS, BLOCK_R, BLOCK_K, GP, BLOCK_D, INT64)
    q = tl.load(Q + q_rows[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for ks in range(start, unmasked_end, BLOCK_K):
        acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q, K, V, kv_rows, ks, last, tile_last, cols, col_ok, qk_scale, D,
                                     BLOCK_R, BLOCK_K, False)
    for ks in range(unmasked_end, stop, BLOCK_K):
        acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q, K, V, kv_rows, ks, last, tile_last, cols, col_ok, qk_scale, D,
                                     BLOCK_R, BLOCK_K, True)

    home = (heads * Tq + t) * N + n  # the pair's own place: no two programs write it
    out = acc / l_i[:, None]
    tl.store(O_PART + home[:, None] * D + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])
    tl.store(LSE_PART + home, (m_i + tl.log2(l_i)) * _LN2, mask=row_ok)


@triton.jit
def _dq_keys(dq, q, do, lse2, delta, K, V, kv_rows, ks, last, tile_last, cols, col_ok, qk_scale, D,
             BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, MASK: tl.constexpr):
    """``dq + dS K`` (fp32, unscaled) of the ``[BLOCK_R]`` rows over keys ``ks .. ks + BLOCK_K - 1``, with ``P =
    exp2(S * qk_scale - lse2)`` recomputed from each row's final log-sum-exp (``lse2`` in log2 units), ``dP = dO
    V^T``, ``dS = P (dP - delta)``. ``MASK`` as ``_attend_keys``."""
    keys = ks + tl.arange(0, BLOCK_K)
    kv = (kv_rows + keys) * D
    if MASK:
        kv_mask = (keys <= tile_last)[:, None] & col_ok[None, :]
    else:
        kv_mask = col_ok[None, :]
    k = tl.load(K + kv[:, None] + cols[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + kv[:, None] + cols[None, :], mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_R, BLOCK_K], tl.float32)) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])  # <= 1: lse is the row's log-sum-exp over all its blocks
    if MASK:  # zero, not -inf in s: keys past a row's position (or the loaded zeros past the tile's last key)
        p = tl.where(keys[None, :] <= last[:, None], p, 0.0)
    dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_R, BLOCK_K], tl.float32))
    ds = _to(p * (dp - delta[:, None]), q.dtype)  # rounded to the input dtype before the next product, as P is
    return _dot(ds, k, dq)


@triton.jit
def block_major_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, Q_POS, PAIRS, TILES, DQ_PART, scale, qk_scale,
    HQ, HKV, HS, Tq, Tk, N, D, n_blocks,
    BS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, GP: tl.constexpr, BLOCK_D: tl.constexpr,
    INT64: tl.constexpr,
):
    """``DQ_PART [B, HQ, Tq, N, D]`` (fp32) of the pairs of one row tile over one key block: each pair's ``scale *
    dS K`` over the block's keys, at the pair's own place (``dq = DQ_PART.sum(-2)``). Schedule, grid and ``TILES``
    as ``block_major_fwd_kernel``; ``DO [B, HQ, Tq, D]`` (q's dtype), ``LSE`` (the forward's merged log-sum-exp,
    natural log) and ``DELTA = rowsum(dO * O)`` ``[B, HQ, Tq]`` (fp32); ``qk_scale = scale * log2(e)``."""
    heads, t, n, row_ok, cols, col_ok, q_rows, kv_rows, last, tile_last, start, unmasked_end, stop = _tile(
        TILES, PAIRS, Q_POS, HQ, HKV, HS, Tq, Tk, N, D, n_blocks, BS, BLOCK_R, BLOCK_K, GP, BLOCK_D, INT64)
    qd_mask = row_ok[:, None] & col_ok[None, :]
    q = tl.load(Q + q_rows[:, None] + cols[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + q_rows[:, None] + cols[None, :], mask=qd_mask, other=0.0)
    delta = tl.load(DELTA + heads * Tq + t, mask=row_ok, other=0.0)
    # P = exp2(S * log2(e) - lse * log2(e)). A listed pair sees a key, so its row's lse is finite; padding rows (and,
    # defensively, a row without keys: lse = -inf) take +inf, so their P is 0, never exp(-inf - -inf) = NaN.
    lse = tl.load(LSE + heads * Tq + t, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)

    dq = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for ks in range(start, unmasked_end, BLOCK_K):
        dq = _dq_keys(dq, q, do, lse2, delta, K, V, kv_rows, ks, last, tile_last, cols, col_ok, qk_scale, D,
                      BLOCK_R, BLOCK_K, False)
    for ks in range(unmasked_end, stop, BLOCK_K):
        dq = _dq_keys(dq, q, do, lse2, delta, K, V, kv_rows, ks, last, tile_last, cols, col_ok, qk_scale, D,
                      BLOCK_R, BLOCK_K, True)
    # The pair's own place (no two programs write it), in int64 whatever INT64 says: DQ_PART is N times q's size,
    # so it passes 2^31 elements long before the inputs do, and int64 offsets held through the loop cost registers
    # (at head dim 256, 64 x 32 tiles spilled with them and fit without).
    home = (heads * Tq + t).to(tl.int64) * N + n
    tl.store(DQ_PART + home[:, None] * D + cols[None, :], dq * scale, mask=qd_mask)


def split_blocks(block_index: torch.Tensor, block_size: int, into: int) -> torch.Tensor:
    """``block_index [B, HS, Tq, N]`` of ``block_size``-key blocks as ``[B, HS, Tq, N * block_size / into]`` of
    ``into``-key blocks: block ``b`` becomes blocks ``b * r`` to ``b * r + r - 1`` (``r = block_size / into``); ``-1``
    stays ``-1``. The same keys, so the same attention (the backward kernels take at most 128-key blocks)."""
    ratio = block_size // into
    parts = block_index.long()[..., None] * ratio + torch.arange(ratio, device=block_index.device)
    parts = torch.where(block_index[..., None] >= 0, parts, -1)
    return parts.flatten(-2).to(block_index.dtype)


def pair_lists(block_index: torch.Tensor, q_pos: torch.Tensor, block_size: int, heads: int, kv_heads: int,
               num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pairs, offsets)`` int32: list ``i = (b * HKV + kv head) * n_blocks + block`` holds
    ``pairs[offsets[i]:offsets[i + 1]]``, the flat ``(row, slot)`` pairs ``((b * HS + hs) * Tq + t) * N + n`` of
    ``block_index [B, HS, Tq, N]`` that selected that block and see one of its keys, ascending.

    ``triton_selected.invert_selection`` applied to each pair as a row of its own (``[B, HS, Tq * N, 1]``, each row's
    position repeated ``N`` times): its flat rows are then exactly these pair numbers, in the same order."""
    batch, sel_heads, tq, slots = block_index.shape
    pairs_as_rows = block_index.reshape(batch, sel_heads, tq * slots, 1)
    positions = q_pos.repeat_interleave(slots, dim=1)
    return ts.invert_selection(pairs_as_rows, positions, block_size, heads, kv_heads, num_keys)


def row_tiles(offsets: torch.Tensor, per_tile: int) -> torch.Tensor:
    """``[num_tiles, 3]`` int32 (list, first entry, end entry): every non-empty list of ``offsets`` (``pair_lists``)
    cut into tiles of at most ``per_tile`` entries, in list order (tiles of one key block are neighbours: its keys
    stay in L2)."""
    counts = (offsets[1:] - offsets[:-1]).long()
    tiles = -(-counts // per_tile)
    total = int(tiles.sum())  # one host sync: the grid size
    lists = torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), tiles, output_size=total)
    before = torch.cumsum(tiles, 0) - tiles  # tiles of earlier lists
    first = offsets[:-1].long()[lists] + (torch.arange(total, device=offsets.device) - before[lists]) * per_tile
    return torch.stack([lists, first, offsets[1:].long()[lists]], 1).to(torch.int32).contiguous()


def merge_partials(o_part: torch.Tensor, lse_part: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """``(out [B, HQ, Tq, D] in dtype, lse [B, HQ, Tq] fp32)`` from ``o_part [B, HQ, Tq, N, D]`` (normalised) and
    ``lse_part [B, HQ, Tq, N]`` (fp32, natural log, ``-inf`` for a pair without keys): ``lse = logsumexp_n lse_n``,
    ``out = Σ_n exp(lse_n - lse) o_n``; a row whose pairs are all ``-inf`` gets ``out = 0``, ``lse = -inf``.
    ``o_part`` is overwritten. An elementwise product and a sum, not a matmul: no TF32 under any matmul precision."""
    lse = torch.logsumexp(lse_part, -1)
    weights = torch.exp(lse_part - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])  # exp(-inf) = 0
    out = o_part.mul_(weights[..., None]).sum(-2)
    return out.to(dtype), lse


@triton.jit
def merge_partials_kernel(O_PART, LSE_PART, OUT, LSE, rows, N, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, INT64: tl.constexpr):
    """``OUT [rows, D]`` (the output's dtype) and ``LSE [rows]`` (fp32) of ``BLOCK_M`` rows merged from ``O_PART
    [rows, N, D]`` and ``LSE_PART [rows, N]`` as ``merge_partials`` does, reading only the partials of pairs with a
    finite ``lse_n`` (so ``O_PART`` needs no initialisation). Grid ``(cdiv(rows, BLOCK_M),)``."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64:
        r = r.to(tl.int64)
    row_ok = r < rows
    slots = tl.arange(0, BLOCK_N)
    lse_n = tl.load(LSE_PART + r[:, None] * N + slots[None, :], mask=row_ok[:, None] & (slots < N)[None, :],
                    other=float("-inf"))
    peak = tl.max(lse_n, 1)
    peak = tl.where(peak == float("-inf"), 0.0, peak)  # a row without keys: every weight exp(-inf) = 0
    total = tl.sum(tl.exp(lse_n - peak[:, None]), 1)
    alive = total > 0.0
    lse = tl.where(alive, peak + tl.log(tl.where(alive, total, 1.0)), float("-inf"))  # -inf: a row without keys
    base = tl.where(alive, lse, 0.0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n in range(N):  # a fixed order: deterministic
        part = tl.load(LSE_PART + r * N + n, mask=row_ok, other=float("-inf"))
        live = part > float("-inf")
        o = tl.load(O_PART + (r * N + n)[:, None] * D + cols[None, :], mask=live[:, None] & col_ok[None, :], other=0.0)
        acc += tl.exp(part - base)[:, None] * o
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(OUT + r[:, None] * D + cols[None, :], _to(acc, OUT.dtype.element_ty), mask=out_mask)
    tl.store(LSE + r, lse, mask=row_ok)


#: Rows per program of ``merge_partials_kernel``.
MERGE_ROWS = 16


def merge_launch(o_part, lse_part, out, lse) -> tuple[tuple, dict]:
    """``(grid, kwargs)`` of ``merge_partials_kernel`` (tensors may be meta tensors, for ``lce.kernels.inspect``)."""
    batch, heads, tq, slots, dim = o_part.shape
    rows = batch * heads * tq
    kwargs = {"O_PART": o_part, "LSE_PART": lse_part, "OUT": out, "LSE": lse, "rows": rows, "N": slots, "D": dim,
              "BLOCK_M": MERGE_ROWS, "BLOCK_N": max(2, triton.next_power_of_2(slots)),
              "BLOCK_D": max(16, triton.next_power_of_2(dim)), "INT64": o_part.numel() >= 2 ** 31, "num_warps": 4,
              "num_stages": 1}
    return (triton.cdiv(rows, MERGE_ROWS),), kwargs


def merge_partials_fused(o_part: torch.Tensor, lse_part: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor,
                                                                                                       torch.Tensor]:
    """``merge_partials`` in one Triton kernel (``merge_partials_kernel``): reads each visited pair's partial once and
    never reads the others, so ``o_part`` may be uninitialised where ``lse_part`` is ``-inf``; ``o_part`` is kept."""
    batch, heads, tq, _, dim = o_part.shape
    out = torch.empty(batch, heads, tq, dim, dtype=dtype, device=o_part.device)
    lse = torch.empty(batch, heads, tq, dtype=torch.float32, device=o_part.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    grid, kwargs = merge_launch(o_part, lse_part, out, lse)
    with on_device_of(o_part):
        merge_partials_kernel[grid](**kwargs)
    return out, lse


def check_block_major(q: torch.Tensor, k: torch.Tensor, block_index: torch.Tensor, block_size: int) -> None:
    """A one-line ``LceError`` for what this path does not take (the ``ref`` backend takes all of it)."""
    if block_size not in BLOCK_SIZES:
        raise LceError(f"selected_attention: the block-major triton forward takes block sizes "
                       f"{', '.join(map(str, BLOCK_SIZES))} (powers of two from 16 to 4096), got {block_size}; use "
                       "backend 'ref' for other sizes")
    ts.check_supported(q, k, block_index, min(block_size, BACKWARD_BLOCK))  # dtype, head dim, the backward's grids
    if block_index.numel() >= 2 ** 31:
        raise LceError(f"selected_attention: the block-major triton forward numbers the (query, slot) pairs in int32; "
                       f"block_index {tuple(block_index.shape)} has 2^31 or more; use backend 'ref'")


def tiles_for(device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int, group: int,
              block_rows: int | None = None, block_keys: int | None = None,
              table: dict[tuple[int, bool], tuple[int, int, int, int]] = LAUNCH_TABLE) -> dict[str, int]:
    """``{"BLOCK_R", "BLOCK_K", "GP", "num_warps", "num_stages"}`` for inputs on ``device`` of ``dtype`` and
    ``head_dim`` with ``group`` query heads per selection (``table``: ``LAUNCH_TABLE`` for the forward,
    ``DQ_LAUNCH_TABLE`` for the dq kernel; CPU tensors run in the interpreter: ``INTERPRETER_TILES``; meta tensors
    count as CUDA). ``block_rows``/``block_keys`` override the table (tests)."""
    tile = max(16, triton.next_power_of_2(head_dim))
    rows, keys, warps, stages = table[(tile, dtype == torch.float32)]
    if device.type == "cpu":
        rows, keys = INTERPRETER_TILES
    gp = triton.next_power_of_2(group)
    return {"BLOCK_R": max(block_rows or rows, gp, 16), "BLOCK_K": min(block_keys or keys, block_size), "GP": gp,
            "num_warps": warps, "num_stages": stages}


def block_major_launch(q, k, v, block_index, q_pos, pairs, tiles, o_part, lse_part, block_size: int, scale: float,
                       options: dict[str, int]) -> tuple[tuple, dict]:
    """``(grid, kwargs)`` of ``block_major_fwd_kernel`` with the tile ``options`` of ``tiles_for`` (``tiles`` cut
    into ``BLOCK_R // GP`` pairs per tile). Tensors may be meta tensors: ``lce.kernels.inspect`` compiles what this
    returns."""
    heads, tq, dim = q.shape[1:]
    sel_heads, slots = block_index.shape[1], block_index.shape[3]
    big = max(q.numel(), k.numel(), o_part.numel()) >= 2 ** 31
    kwargs = {"Q": q, "K": k, "V": v, "Q_POS": q_pos, "PAIRS": pairs, "TILES": tiles, "O_PART": o_part,
              "LSE_PART": lse_part, "qk_scale": scale * ts.LOG2E, "HQ": heads, "HKV": k.shape[1], "HS": sel_heads,
              "Tq": tq, "Tk": k.shape[2], "N": slots, "D": dim, "n_blocks": -(-k.shape[2] // block_size),
              "BS": block_size, "BLOCK_D": max(16, triton.next_power_of_2(dim)), "INT64": big, **options}
    return (tiles.shape[0],), kwargs


def block_major_forward(q, k, v, block_index, q_pos, block_size: int, scale: float, block_rows: int | None = None,
                        block_keys: int | None = None, merge: str | None = None):
    """``(out [B, HQ, Tq, D], lse [B, HQ, Tq] fp32)`` of contiguous inputs (``block_index`` without repeats:
    ``drop_repeated_blocks``). ``block_rows``/``block_keys``: tile overrides (tests); ``merge``: ``"torch"``
    (``merge_partials``) or ``"triton"`` (``merge_partials_fused``), None: ``MERGE``."""
    batch, heads, tq, dim = q.shape
    slots = block_index.shape[-1]
    fused = (merge or MERGE) == "triton"
    # The fused merge never reads a pair no program wrote: no zero fill (a pass over the largest buffer).
    o_part = (torch.empty if fused else torch.zeros)(batch, heads, tq, slots, dim, dtype=torch.float32,
                                                      device=q.device)
    lse_part = torch.full((batch, heads, tq, slots), float("-inf"), dtype=torch.float32, device=q.device)
    merged = merge_partials_fused if fused else merge_partials
    if q.numel() == 0 or k.shape[2] == 0 or slots == 0:  # nothing to launch: every row sees no key (output 0)
        return merge_partials(o_part.zero_(), lse_part, q.dtype)
    options = tiles_for(q.device, q.dtype, dim, block_size, heads // block_index.shape[1], block_rows, block_keys)
    pairs, offsets = pair_lists(block_index, q_pos, block_size, heads, k.shape[1], k.shape[2])
    tiles = row_tiles(offsets, options["BLOCK_R"] // options["GP"])
    if tiles.shape[0]:
        grid, kwargs = block_major_launch(q, k, v, block_index, q_pos, pairs, tiles, o_part, lse_part, block_size,
                                          scale, options)
        with on_device_of(q):
            block_major_fwd_kernel[grid](**kwargs)
    return merged(o_part, lse_part, q.dtype)


def block_major_dq_launch(q, k, v, do, lse, delta, block_index, q_pos, pairs, tiles, dq_part, block_size: int,
                          scale: float, options: dict[str, int]) -> tuple[tuple, dict]:
    """``(grid, kwargs)`` of ``block_major_bwd_dq_kernel`` with the tile ``options`` of ``tiles_for(...,
    table=DQ_LAUNCH_TABLE)`` (``tiles`` cut into ``BLOCK_R // GP`` pairs per tile). Tensors may be meta tensors:
    ``lce.kernels.inspect`` compiles what this returns."""
    heads, tq, dim = q.shape[1:]
    sel_heads, slots = block_index.shape[1], block_index.shape[3]
    big = max(q.numel(), k.numel()) >= 2 ** 31  # not dq_part's: the kernel stores to it with int64 offsets anyway
    kwargs = {"Q": q, "K": k, "V": v, "DO": do, "LSE": lse, "DELTA": delta, "Q_POS": q_pos, "PAIRS": pairs,
              "TILES": tiles, "DQ_PART": dq_part, "scale": scale, "qk_scale": scale * ts.LOG2E, "HQ": heads,
              "HKV": k.shape[1], "HS": sel_heads, "Tq": tq, "Tk": k.shape[2], "N": slots, "D": dim,
              "n_blocks": -(-k.shape[2] // block_size), "BS": block_size,
              "BLOCK_D": max(16, triton.next_power_of_2(dim)), "INT64": big, **options}
    return (tiles.shape[0],), kwargs


def block_major_dq(q, k, v, do, lse, delta, block_index, q_pos, pairs, offsets, block_size: int, scale: float,
                   block_rows: int | None = None, block_keys: int | None = None) -> torch.Tensor:
    """``dq [B, HQ, Tq, D]`` in q's dtype by ``block_major_bwd_dq_kernel`` over the pair lists ``(pairs, offsets)``
    of ``pair_lists`` (any block size of ``BLOCK_SIZES``, walked in sub-tiles), then ``DQ_PART.sum(-2)`` (fp32, a
    fixed order). ``lse``: the forward's merged log-sum-exp; ``delta = rowsum(dO * O)`` (both ``[B, HQ, Tq]`` fp32);
    ``block_rows``/``block_keys``: tile overrides (tests)."""
    batch, heads, tq, dim = q.shape
    # Zeros: pairs no program visits (-1 slots, blocks in the future or past the keys) contribute nothing.
    dq_part = torch.zeros(batch, heads, tq, block_index.shape[-1], dim, dtype=torch.float32, device=q.device)
    options = tiles_for(q.device, q.dtype, dim, block_size, heads // block_index.shape[1], block_rows, block_keys,
                        DQ_LAUNCH_TABLE)
    tiles = row_tiles(offsets, options["BLOCK_R"] // options["GP"])
    if tiles.shape[0]:
        grid, kwargs = block_major_dq_launch(q, k, v, do, lse, delta, block_index, q_pos, pairs, tiles, dq_part,
                                             block_size, scale, options)
        with on_device_of(q):
            block_major_bwd_dq_kernel[grid](**kwargs)
    return dq_part.sum(-2).to(q.dtype)


def block_major_backward(q, k, v, out, do, lse, block_index, q_pos, block_size: int, scale: float,
                         block_rows: int | None = None, block_keys: int | None = None):
    """``(dq, dk, dv)`` in the inputs' dtypes from contiguous inputs, the merged ``out`` and ``lse`` of the forward
    and ``block_index`` without repeats: ``dq`` by ``block_major_dq`` (the block whole), ``dk``/``dv`` by
    ``triton_selected.selected_bwd_dk_dv_kernel`` (blocks over 128 keys handed to it as 128-key blocks:
    ``split_blocks``). ``block_rows``/``block_keys``: the dq kernel's tile overrides (tests)."""
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    heads, kv_heads, num_keys = q.shape[1], k.shape[1], k.shape[2]
    # fp32 elementwise (no matmul, so no TF32); both backward kernels read it.
    delta = (do.float() * out.float()).sum(-1)
    pairs, offsets = pair_lists(block_index, q_pos, block_size, heads, kv_heads, num_keys)
    dq = block_major_dq(q, k, v, do, lse, delta, block_index, q_pos, pairs, offsets, block_size, scale, block_rows,
                        block_keys)
    if block_size > BACKWARD_BLOCK:
        block_index = split_blocks(block_index, block_size, BACKWARD_BLOCK)
        block_size = BACKWARD_BLOCK
        rows, offsets = ts.invert_selection(block_index, q_pos, block_size, heads, kv_heads, num_keys)
    else:
        # The dk/dv kernel's lists are the pair lists with each pair's row for the pair: a row lists a block at most
        # once (no repeats), so pair -> pair // N keeps the lists' contents and ascending order (one sort saved).
        rows = torch.div(pairs, block_index.shape[-1], rounding_mode="floor")
    dk, dv = torch.empty_like(k), torch.empty_like(v)  # the kernel writes every key block
    # Only the dk/dv launch of the pair: its dq entry (the per-token kernel) is not run; ``dq`` is a placeholder.
    grid, kwargs = ts.backward_launches(q, k, v, out, do, lse, delta, block_index, q_pos, rows, offsets, dq, dk, dv,
                                        block_size, scale)["dk_dv"]
    with on_device_of(q):
        ts.selected_bwd_dk_dv_kernel[grid](**kwargs)
    return dq, dk, dv


def selected_attention_block_major(q, k, v, block_index, block_size: int, scale: float, q_pos=None) -> torch.Tensor:
    """The key-block-major Triton path of ``lce.kernels.selected_attention.selected_attention`` (arguments and result
    as ``reference.selected_attention_reference``; the op has checked the shapes and dropped repeated blocks).

    Differentiable in ``q``, ``k``, ``v``: the backward (``block_major_backward``) runs the key-block-major dq kernel
    (any block size) and ``triton_selected``'s dk/dv kernel on the merged output and log-sum-exp; for the latter a
    block over 128 keys is handed over as 128-key blocks (``split_blocks``: the same keys, the same gradients), not
    recomputed in PyTorch.

    Raises:
        LceError: a block size, dtype, head dim or size the kernels do not take (``check_block_major``).
    """
    check_block_major(q, k, block_index, block_size)
    if q_pos is None:
        tq, tk = q.shape[2], k.shape[2]
        q_pos = torch.arange(tk - tq, tk, device=q.device)[None].expand(q.shape[0], tq)
    out, _ = ts.SelectedAttentionFunction.apply(q, k, v, block_index, q_pos, int(block_size), float(scale),
                                                block_major_forward, block_major_backward)
    return out
