"""Which key tiles each query tile visits (and the transpose for the dK/dV pass): block-sparse iteration.

FlexAttention's ``kv_num_blocks`` / ``kv_indices`` idea (Dong et al. 2024, arXiv:2412.05496 §4.2): the host lists,
per (batch row, query tile), the key tiles that may hold a visible pair, and the kernel loops over that list only,
so empty tiles cost nothing: a sliding window of ``W`` costs ``O(T * (W + tile))``, a block mask its nonzero blocks.

A tile is listed when the rules *could* hold for some pair in it, judged from the tile's position bounds (min and
max, so positions need not be contiguous or sorted): causality, the window and sinks, the block mask (an
inclusion-exclusion count over a summed-area table of the mask) and, with segments, the pair selection of some
segment. The kernels apply the exact per-pair rules inside the tiles they visit, so listing a tile too many costs time
but never changes a result; missing one would, which ``tests/kernels/attention/test_schedule.py`` guards against.

Everything is computed with torch ops on the positions' device (no host synchronisation); the lists are
``[B, nQT, nKT]`` int32, ``(T / tile)^2`` entries (1M for ``T = 64k`` with 64-token tiles).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lce.kernels.attention.spec import AttentionSpec

BIG = 2**31 - 1  # sentinel bound beyond any position (positions are checked to stay within +-2^30)


@dataclass(frozen=True)
class TileSchedule:
    """Tile lists of one call.

    Attributes:
        block_m, block_n: query and key tile sizes.
        kv_count: ``[B, nQT]`` int32, how many key tiles each query tile visits.
        kv_index: ``[B, nQT, nKT]`` int32, those key tiles in ascending order (first ``kv_count`` entries valid).
        q_count: ``[B, nKT]`` int32 and q_index ``[B, nKT, nQT]`` int32: the transpose (query tiles per key tile).
    """

    block_m: int
    block_n: int
    kv_count: torch.Tensor
    kv_index: torch.Tensor
    q_count: torch.Tensor
    q_index: torch.Tensor


def tile_bounds(pos: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest position of each tile: ``pos [B, T]`` -> ``lo, hi [B, ceil(T / block)]``."""
    batch, length = pos.shape
    pad = -length % block
    lo = torch.nn.functional.pad(pos, (0, pad), value=BIG).view(batch, -1, block).amin(-1)
    hi = torch.nn.functional.pad(pos, (0, pad), value=-BIG).view(batch, -1, block).amax(-1)
    return lo, hi


def _floor_div(x: torch.Tensor, d: int) -> torch.Tensor:
    return torch.div(x, d, rounding_mode="floor")


def _block_mask_hits(spec: AttentionSpec, q_lo, q_hi, k_lo, k_hi) -> torch.Tensor:
    """Whether the block-mask rectangle spanned by each (query tile, key tile) holds a True block."""
    mask = spec.block_mask.to(q_lo.device)
    n_qb, n_kb = mask.shape
    table = torch.nn.functional.pad(mask.to(torch.int32).cumsum(0).cumsum(1), (1, 0, 1, 0))  # [nQB+1, nKB+1]
    r0 = _floor_div(q_lo, spec.block_size).clamp(0, n_qb)[:, :, None]
    r1 = (_floor_div(q_hi, spec.block_size) + 1).clamp(0, n_qb)[:, :, None]
    c0 = _floor_div(k_lo, spec.block_size).clamp(0, n_kb)[:, None, :]
    c1 = (_floor_div(k_hi, spec.block_size) + 1).clamp(0, n_kb)[:, None, :]
    count = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
    return (count > 0) & (r1 > r0) & (c1 > c0)


def _any_segment_selects(spec: AttentionSpec, q_lo, q_hi, k_lo, k_hi) -> torch.Tensor:
    """Whether some segment's pair selection can hold between the position ranges of the two tiles."""
    possible = torch.zeros(q_lo.shape[0], q_lo.shape[1], k_lo.shape[1], dtype=torch.bool, device=q_lo.device)
    for segment in spec.segments:
        sel = segment.select
        gap_min = _floor_div(q_lo, sel.div)[:, :, None] - _floor_div(k_hi, sel.div)[:, None, :]
        gap_max = _floor_div(q_hi, sel.div)[:, :, None] - _floor_div(k_lo, sel.div)[:, None, :]
        ok = torch.ones_like(possible)
        if sel.lo is not None:
            ok = ok & (gap_max >= sel.lo)
        if sel.hi is not None:
            ok = ok & (gap_min < sel.hi)
        if sel.key_below is not None:
            ok = ok & (k_lo < sel.key_below)[:, None, :]
        possible = possible | ok
    return possible


def tile_visibility(spec: AttentionSpec, q_pos: torch.Tensor, k_pos: torch.Tensor, block_m: int,
                    block_n: int) -> torch.Tensor:
    """bool ``[B, nQT, nKT]``: the (query tile, key tile) pairs that may hold a visible pair."""
    q_lo, q_hi = tile_bounds(q_pos, block_m)
    k_lo, k_hi = tile_bounds(k_pos, block_n)
    ok = k_lo[:, None, :] <= q_hi[:, :, None]
    if spec.window is not None:
        near = (q_lo[:, :, None] - k_hi[:, None, :]) < spec.window
        sink = ((k_hi >= 0) & (k_lo < spec.sink_tokens))[:, None, :]
        ok = ok & (near | sink)
    if spec.block_mask is not None:
        ok = ok & _block_mask_hits(spec, q_lo, q_hi, k_lo, k_hi)
    if spec.segments:
        ok = ok & _any_segment_selects(spec, q_lo, q_hi, k_lo, k_hi)
    return ok


def _lists(visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts ``[..., ]`` and ascending indices ``[..., n]`` of the True entries of ``visible [..., n]``."""
    count = visible.sum(-1, dtype=torch.int32)
    # A stable sort of "not visible" puts the visible tiles first, in ascending order.
    index = torch.sort((~visible).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    return count, index.contiguous()


def build_schedule(spec: AttentionSpec, q_pos: torch.Tensor, k_pos: torch.Tensor, block_m: int,
                   block_n: int) -> TileSchedule:
    """The tile lists for ``q_pos [B, Tq]`` and ``k_pos [B, Tk]`` (int) under ``spec``."""
    visible = tile_visibility(spec, q_pos.to(torch.int64), k_pos.to(torch.int64), block_m, block_n)
    kv_count, kv_index = _lists(visible)
    q_count, q_index = _lists(visible.transpose(1, 2))
    return TileSchedule(block_m, block_n, kv_count, kv_index, q_count, q_index)
