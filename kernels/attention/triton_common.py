"""Triton building blocks shared by the forward and backward attention kernels: positions, visibility, RoPE and the
per-tile scores of all segments (``spec.py`` semantics; the reference is ``reference.py``).

Segments reach the kernels as an int32 table ``[N_SEG, SEG_FIELDS]`` (``segment_table``): each row holds the query
map, the key map (``div, mod, mul, add, cap, below, otherwise``; ``mod`` 0 = none, open bounds as +-(2^31 - 1)) and
the pair selection (``div, lo, hi, key_below``). Loading a few scalars per tile costs nothing next to the dot
products, and one compiled kernel serves every method and parameter value.

Under partial rotary and both RoPE styles a head vector splits into three tiles: the two halves of the rotated pairs
(``half``: ``x[d]`` and ``x[d + R/2]``; ``interleaved``: ``x[2d]`` and ``x[2d + 1]``) and the unrotated rest
``x[R:]``, so a logit is a sum of three partial dot products and the rest's product is shared by all segments.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lce.kernels.attention.schedule import BIG
from lce.kernels.attention.spec import AttentionSpec, PositionMap

Q_MAP, K_MAP, SELECT, SEG_FIELDS = 0, 7, 14, 18


def _map_row(m: PositionMap) -> list[int]:
    return [m.div, m.mod or 0, m.mul, m.add, BIG if m.cap is None else m.cap,
            BIG if m.below is None else m.below, m.otherwise]


def segment_table(spec: AttentionSpec, device: torch.device) -> torch.Tensor:
    """int32 ``[max(1, N_SEG), SEG_FIELDS]``: the spec's segments as the kernels read them (read-only, shared)."""
    return _segment_table(spec.segments, device)


# Cached per (segments, device): building the table copies a host list to the GPU, and a blocking host-to-device copy
# waits for the whole stream to drain (a host synchronisation in every attention forward and backward otherwise).
# Segments are frozen dataclasses of ints, so equal specs share one table; there are a handful per run.
@functools.lru_cache(maxsize=64)
def _segment_table(segments: tuple, device: torch.device) -> torch.Tensor:
    rows = []
    for seg in segments:
        sel = seg.select
        rows.append(_map_row(seg.q_map) + _map_row(seg.k_map) + [
            sel.div, -BIG if sel.lo is None else sel.lo, BIG if sel.hi is None else sel.hi,
            BIG if sel.key_below is None else sel.key_below])
    return torch.tensor(rows or [[0] * SEG_FIELDS], dtype=torch.int32, device=device)


def next_power_of_2(n: int, minimum: int = 16) -> int:
    """Tile width for ``n`` columns: a power of two, at least 16 (``tl.dot`` needs K >= 16)."""
    return max(minimum, triton.next_power_of_2(max(n, 1)))


# Floor division by d >= 1 is written out as (a - ((a % d + d) % d)) // d: ``(a % d + d) % d`` is the floor remainder
# whether ``%`` truncates (compiled Triton, as C) or floors (the interpreter, as NumPy), and the division is then
# exact. It is inlined rather than a jit helper because the interpreter re-patches triton.language on every helper
# call (about half a millisecond), which dominated the test time.


@triton.jit
def position_map(p, seg_ptr, base):
    """``where(r < below, min(mul * r + add, cap), otherwise)``, ``r = (p // div) % mod`` (``spec.PositionMap``)."""
    div = tl.load(seg_ptr + base)
    mod = tl.load(seg_ptr + base + 1)
    mul = tl.load(seg_ptr + base + 2)
    add = tl.load(seg_ptr + base + 3)
    cap = tl.load(seg_ptr + base + 4)
    below = tl.load(seg_ptr + base + 5)
    otherwise = tl.load(seg_ptr + base + 6)
    r = (p - ((p % div + div) % div)) // div
    safe_mod = tl.maximum(mod, 1)
    r = tl.where(mod > 0, (r % safe_mod + safe_mod) % safe_mod, r)
    out = tl.minimum(mul * r + add, cap)
    return tl.where(r < below, out, otherwise)


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
def segment_possible(seg_ptr, base, i_lo, i_hi, j_lo, j_hi):
    """Whether the segment's pair selection can hold between query positions in ``[i_lo, i_hi]`` and key positions
    in ``[j_lo, j_hi]`` (floor division is monotonic, so the gap's range comes from the bounds)."""
    div = tl.load(seg_ptr + base)
    lo = tl.load(seg_ptr + base + 1)
    hi = tl.load(seg_ptr + base + 2)
    key_below = tl.load(seg_ptr + base + 3)
    gap_min = (i_lo - ((i_lo % div + div) % div)) // div - (j_hi - ((j_hi % div + div) % div)) // div
    gap_max = (i_hi - ((i_hi % div + div) % div)) // div - (j_lo - ((j_lo % div + div) % div)) // div
    return (gap_max >= lo) & (gap_min < hi) & (j_lo < key_below)


@triton.jit
def rope(x1, x2, pos, freq, attention_scaling):
    """Rotate pairs ``(x1, x2)`` ``[T, R/2]`` (fp32) by ``pos [T] * freq [R/2]`` (RoPE, arXiv:2104.09864 eq. 34),
    cos and sin times ``attention_scaling``; ``-pos`` applies the transpose (used by the backward pass)."""
    angle = pos.to(tl.float32)[:, None] * freq[None, :]
    cos = tl.cos(angle) * attention_scaling
    sin = tl.sin(angle) * attention_scaling
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def logn_multiplier(i, inv_log_length):
    """``max(1, ln(i + 1) / ln(L))`` (positions below 0 count as 0)."""
    return tl.maximum(tl.log(tl.maximum(i, 0).to(tl.float32) + 1.0) * inv_log_length, 1.0)


@triton.jit
def head_columns(R2, D, BLOCK_R2: tl.constexpr, BLOCK_REST: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Columns of the three tiles of a head vector (rotated halves, rest) and their masks."""
    offs_r = tl.arange(0, BLOCK_R2)
    if INTERLEAVED:
        col1 = 2 * offs_r
        col2 = 2 * offs_r + 1
    else:
        col1 = offs_r
        col2 = offs_r + R2
    offs_e = tl.arange(0, BLOCK_REST)
    return col1, col2, offs_r < R2, 2 * R2 + offs_e, offs_e < D - 2 * R2


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
        hit = tl.load(mask_ptr + qb.to(tl.int64)[:, None] * n_kb + kb[None, :], mask=inside, other=0)
        ok = inside & (hit != 0)
    return ok


@triton.jit
def tile_scores(q1, q2, q_rest, k1, k2, k_rest, i, j, visible, i_lo, i_hi, j_lo, j_hi, seg_ptr, freq,
                attention_scaling, scale, slope,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_SEG: tl.constexpr, HAS_REST: tl.constexpr,
                HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scaled logits ``[M, N]`` fp32 of one tile (-inf where hidden) and the segment owning each pair.

    With ``N_SEG == 0`` q and k carry no rotation here (rotated by the caller or not at all) and only the rest tiles
    (the whole head) are used. Otherwise every segment whose selection can hold in the tile rotates the query
    halves at ``q_map(i)`` and the key halves at ``k_map(j)``; the last segment selecting a pair owns it.
    """
    if HAS_REST:
        shared = tl.dot(q_rest, tl.trans(k_rest), input_precision=DOT_PRECISION)
    else:
        shared = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    owner = tl.full([BLOCK_M, BLOCK_N], -1, dtype=tl.int32)
    if N_SEG == 0:
        scores = tl.where(visible, shared * scale, float("-inf"))
    else:
        scores = tl.full([BLOCK_M, BLOCK_N], float("-inf"), dtype=tl.float32)
        for s in tl.static_range(N_SEG):
            base = s * 18
            if segment_possible(seg_ptr, base + 14, i_lo, i_hi, j_lo, j_hi):
                qa, qb = rope(q1.to(tl.float32), q2.to(tl.float32), position_map(i, seg_ptr, base), freq,
                              attention_scaling)
                ka, kb = rope(k1.to(tl.float32), k2.to(tl.float32), position_map(j, seg_ptr, base + 7), freq,
                              attention_scaling)
                logits = tl.dot(qa.to(q1.dtype), tl.trans(ka.to(k1.dtype)), input_precision=DOT_PRECISION)
                logits += tl.dot(qb.to(q1.dtype), tl.trans(kb.to(k1.dtype)), input_precision=DOT_PRECISION)
                chosen = pair_select(i, j, seg_ptr, base + 14) & visible
                scores = tl.where(chosen, (logits + shared) * scale, scores)
                owner = tl.where(chosen, s, owner)
    if HAS_ALIBI:
        scores = scores - slope * (i[:, None] - j[None, :]).to(tl.float32)
    return scores, owner
