"""Triton building blocks shared by the attention kernels: tile addressing, visibility, segment ownership, log-n
(``spec.py`` semantics; the reference is ``reference.py``).

Segments reach the kernels already rotated (``prerotate.py``: queries once per distinct query position map, keys once
per key map, before any kernel runs), so no kernel computes a sine or cosine: a segment's logit is one full-head dot
product of its rotated query and key tiles. The kernels read an int32 table ``[max(1, N_SEG), SEG_FIELDS]``
(``segment_table``): per segment the index of its rotated queries and keys and its pair selection (``div, lo, hi,
key_below``; open bounds as +-(2^31 - 1)). A spec without segments is one segment that selects every pair.

Logits are kept in base 2: ``scale * log2(e)`` is folded into one multiply, ALiBi's slope likewise, and the softmax
runs on ``exp2`` (one ``MUFU.EX2`` per element); the log-sum-exp the kernels save is in natural units.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lce.kernels.attention.schedule import BIG
from lce.kernels.attention.spec import AttentionSpec

#: Fields per segment row: query-map slot, key-map slot, then the pair selection (div, lo, hi, key_below).
SEG_FIELDS = 6
LOG2E = 1.4426950408889634


def segment_table(spec: AttentionSpec, device: torch.device) -> torch.Tensor:
    """int32 ``[max(1, N_SEG), SEG_FIELDS]``: the spec's segments as the kernels read them (read-only, shared)."""
    return _segment_table(spec.segments, device)


def distinct_maps(segments: tuple) -> tuple[tuple, tuple, list[int], list[int]]:
    """The distinct query and key position maps of ``segments``, in first-use order, and each segment's index into
    them (DCA: three query maps, one key map)."""
    q_maps, k_maps, q_index, k_index = [], [], [], []
    for seg in segments:
        for maps, index, m in ((q_maps, q_index, seg.q_map), (k_maps, k_index, seg.k_map)):
            if m not in maps:
                maps.append(m)
            index.append(maps.index(m))
    return tuple(q_maps), tuple(k_maps), q_index, k_index


def segments_disjoint(segments: tuple) -> bool:
    """Whether no two segments can select a common pair: each pair of them divides positions alike and selects
    disjoint gap ranges (DCA, Self-Extend, ReRoPE and StreamingLLM's segments all do), so the kernels need not check
    which later segment owns a pair."""
    def bounds(sel):
        return (-BIG if sel.lo is None else sel.lo), (BIG if sel.hi is None else sel.hi)

    for a, seg in enumerate(segments):
        for other in segments[a + 1:]:
            (lo1, hi1), (lo2, hi2) = bounds(seg.select), bounds(other.select)
            if seg.select.div != other.select.div or (lo1 < hi2 and lo2 < hi1):
                return False
    return True


# Cached per (segments, device): building the table copies a host list to the GPU, and a blocking host-to-device copy
# waits for the whole stream to drain (a host synchronisation in every attention forward and backward otherwise).
# Segments are frozen dataclasses of ints, so equal specs share one table; there are a handful per run.
@functools.lru_cache(maxsize=64)
def _segment_table(segments: tuple, device: torch.device) -> torch.Tensor:
    _, _, q_index, k_index = distinct_maps(segments)
    rows = []
    for seg, qi, ki in zip(segments, q_index, k_index):
        sel = seg.select
        rows.append([qi, ki, sel.div, -BIG if sel.lo is None else sel.lo, BIG if sel.hi is None else sel.hi,
                     BIG if sel.key_below is None else sel.key_below])
    return torch.tensor(rows or [[0, 0, 1, -BIG, BIG, BIG]], dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=16)
def placeholder(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A one-element tensor passed where a feature is off (allocated once per dtype and device, not per call)."""
    return torch.zeros(1, dtype=dtype, device=device)


def next_power_of_2(n: int, minimum: int = 16) -> int:
    """Tile width for ``n`` columns: a power of two, at least 16 (``tl.dot`` needs K >= 16)."""
    return max(minimum, triton.next_power_of_2(max(n, 1)))


# Floor division by d >= 1 is written out as (a - ((a % d + d) % d)) // d: ``(a % d + d) % d`` is the floor remainder
# whether ``%`` truncates (compiled Triton, as C) or floors (the interpreter, as NumPy), and the division is then
# exact. It is inlined rather than a jit helper because the interpreter re-patches triton.language on every helper
# call (about half a millisecond), which dominated the test time.


@triton.jit
def pair_select(i, j, seg_ptr, base):
    """``lo <= i // div - j // div < hi and j < key_below`` for ``i [M]``, ``j [N]`` -> ``[M, N]``."""
    div = tl.load(seg_ptr + base)
    lo = tl.load(seg_ptr + base + 1)
    hi = tl.load(seg_ptr + base + 2)
    key_below = tl.load(seg_ptr + base + 3)
    gap = ((i - ((i % div + div) % div)) // div)[:, None] - ((j - ((j % div + div) % div)) // div)[None, :]
    return (gap >= lo) & (gap < hi) & (j < key_below)[None, :]


@triton.jit
def owned_pairs(i, j, seg_ptr, s, N_SEG: tl.constexpr, DISJOINT: tl.constexpr):
    """``[M, N]`` bool: the pairs segment ``s`` selects and no later segment does (the last one selecting owns);
    ``DISJOINT``: no two segments select a common pair (``segments_disjoint``), so no later one is checked."""
    owned = pair_select(i, j, seg_ptr, s * 6 + 2)
    if not DISJOINT:
        for later in tl.static_range(N_SEG):
            # A mask, not a branch: ``s`` is a runtime value in the backward kernels (the grid's segment axis). No
            # ``~`` on booleans and no scalar comparison: Triton 3.3's interpreter has no boolean constants.
            taken = pair_select(i, j, seg_ptr, later * 6 + 2).to(tl.int32) * (tl.full([1, 1], later, tl.int32) > s)
            owned = owned & (taken == 0)
    return owned


@triton.jit
def logn_multiplier(i, inv_log_length):
    """``max(1, ln(i + 1) / ln(L))`` (positions below 0 count as 0)."""
    return tl.maximum(tl.log(tl.maximum(i, 0).to(tl.float32) + 1.0) * inv_log_length, 1.0)


@triton.jit
def tile_offsets(rows, cols, row_stride):
    """``rows[:, None] * row_stride + cols[None, :]`` in int64. ``rows`` are int32 and so is ``row_stride`` when it
    fits: the output and its gradient are ``[B, Tq, H, Dv]``, rows ``H * Dv`` apart, and ``Tq * H * Dv`` passes 2^31
    at 512k tokens of 32 heads x 128, where an int32 product would wrap to a wrong address."""
    return rows.to(tl.int64)[:, None] * row_stride + cols[None, :]


@triton.jit
def load_tile(ptr, rows, row_ok, cols, col_ok, row_stride):
    """``ptr[rows, cols]`` of a row-major matrix, 0 where masked."""
    return tl.load(ptr + tile_offsets(rows, cols, row_stride), mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def store_tile(ptr, value, rows, row_ok, cols, col_ok, row_stride):
    tl.store(ptr + tile_offsets(rows, cols, row_stride), value, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def visible_pairs(i, j, row_ok, col_ok, window, sink_tokens, mask_ptr, mask_block, n_qb, n_kb,
                  HAS_WINDOW: tl.constexpr, HAS_BLOCK_MASK: tl.constexpr):
    """Causal pairs of ``i [M]`` x ``j [N]`` the window, sinks and block mask allow (``[M, N]`` bool)."""
    ok = row_ok[:, None] & col_ok[None, :] & (j[None, :] <= i[:, None])
    if HAS_WINDOW:
        ok = ok & (((i[:, None] - j[None, :]) < window) | ((j >= 0) & (j < sink_tokens))[None, :])
    if HAS_BLOCK_MASK:
        qb = (i - ((i % mask_block + mask_block) % mask_block)) // mask_block
        kb = (j - ((j % mask_block + mask_block) % mask_block)) // mask_block
        inside = ((qb >= 0) & (qb < n_qb))[:, None] & ((kb >= 0) & (kb < n_kb))[None, :] & ok
        # int32 offsets (the mask has n_qb * n_kb < 2^31 entries): int64 ones doubled the registers of this tile.
        hit = tl.load(mask_ptr + (qb[:, None] * n_kb + kb[None, :]), mask=inside, other=0)
        ok = inside & (hit != 0)
    return ok


@triton.jit
def masked_logits(qk, i, j, row_ok, col_ok, seg_ptr, window, sink_tokens, mask_ptr, mask_block, n_qb, n_kb, s,
                  N_SEG: tl.constexpr, DISJOINT: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_BLOCK_MASK: tl.constexpr):
    """``qk [M, N]`` where the pair is visible and owned by segment ``s``, -inf elsewhere (a partial tile)."""
    ok = visible_pairs(i, j, row_ok, col_ok, window, sink_tokens, mask_ptr, mask_block, n_qb, n_kb, HAS_WINDOW,
                       HAS_BLOCK_MASK)
    if N_SEG > 0:
        ok = ok & owned_pairs(i, j, seg_ptr, s, N_SEG, DISJOINT)
    return tl.where(ok, qk, float("-inf"))
