"""Which key tiles each query tile visits, per segment, full tiles first (and the transpose for the dK/dV pass).

FlexAttention's ``kv_num_blocks`` / ``kv_indices`` idea (Dong et al. 2024, arXiv:2412.05496 §4.2, with its split into
full and partial blocks): the host lists, per (segment, batch row, query tile), the key tiles that may hold a pair the
segment owns, and the kernel loops over that list only, so empty tiles cost nothing: a sliding window of ``W`` costs
``O(T * (W + tile))``, a block mask its nonzero blocks, and each segment of DCA or Self-Extend only its own band.

Each list starts with the **full** tiles, those where every pair is visible and owned by the segment (judged from the
tiles' position bounds: causal ``k_hi <= q_lo``, inside the window, all block-mask blocks set, the segment's pair
selection holding for every pair and no later segment able to select any), then the **partial** ones. The kernels run
the full tiles without building a mask and apply the exact per-pair rules only in the partial tiles; listing a tile
too many or calling a full tile partial costs time but never changes a result, missing one or calling a partial tile
full would, which ``tests/kernels/attention/test_schedule.py`` guards against.

Everything is computed with torch ops on the positions' device (no host synchronisation, no sort: a cumulative sum
gives each tile its place); indices are int16 when every tile index fits. A forward builds the schedule once for all
its layers: ``cached_schedule`` keeps the last few, keyed on the positions' memory, layout and version and on the
spec's schedule-relevant fields, so the 30 layers of one forward share one.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from lce.kernels.attention.spec import AttentionSpec

BIG = 2**31 - 1  # sentinel bound beyond any position (positions are checked to stay within +-2^30)
# A forward uses one schedule and its backward two more; a segment's lists take 268 MB at 512k tokens (64-token tiles).
SCHEDULES_KEPT = 4


@dataclass(frozen=True)
class TileSchedule:
    """Tile lists of one call, one list per segment (one for a spec without segments).

    Attributes:
        block_m, block_n: query and key tile sizes.
        kv_full: ``[S, B, nQT]`` int32, how many of each list's first tiles are full (no mask needed).
        kv_count: ``[S, B, nQT]`` int32, how many key tiles each query tile visits for segment ``s``.
        kv_index: ``[S, B, nQT, nKT]`` int16/int32, those key tiles, full ones first, each group ascending.
        q_full, q_count ``[S, B, nKT]`` and q_index ``[S, B, nKT, nQT]``: the transpose (query tiles per key tile).
    """

    block_m: int
    block_n: int
    kv_full: torch.Tensor
    kv_count: torch.Tensor
    kv_index: torch.Tensor
    q_full: torch.Tensor
    q_count: torch.Tensor
    q_index: torch.Tensor

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.kv_full, self.kv_count, self.kv_index, self.q_full, self.q_count, self.q_index


def tile_bounds(pos: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest position of each tile: ``pos [B, T]`` -> ``lo, hi [B, ceil(T / block)]``."""
    batch, length = pos.shape
    pad = -length % block
    lo = torch.nn.functional.pad(pos, (0, pad), value=BIG).view(batch, -1, block).amin(-1)
    hi = torch.nn.functional.pad(pos, (0, pad), value=-BIG).view(batch, -1, block).amax(-1)
    return lo, hi


def _floor_div(x: torch.Tensor, d: int) -> torch.Tensor:
    return torch.div(x, d, rounding_mode="floor")


def _block_mask_counts(spec: AttentionSpec, q_lo, q_hi, k_lo, k_hi) -> tuple[torch.Tensor, torch.Tensor]:
    """For each (query tile, key tile): whether the block-mask rectangle its positions span holds a True block, and
    whether it holds only True blocks and lies inside the mask."""
    mask = spec.block_mask.to(q_lo.device)
    n_qb, n_kb = mask.shape
    table = torch.nn.functional.pad(mask.to(torch.int32).cumsum(0).cumsum(1), (1, 0, 1, 0))  # [nQB+1, nKB+1]
    r0_raw = _floor_div(q_lo, spec.block_size)[:, :, None]
    r1_raw = (_floor_div(q_hi, spec.block_size) + 1)[:, :, None]
    c0_raw = _floor_div(k_lo, spec.block_size)[:, None, :]
    c1_raw = (_floor_div(k_hi, spec.block_size) + 1)[:, None, :]
    r0, r1, c0, c1 = r0_raw.clamp(0, n_qb), r1_raw.clamp(0, n_qb), c0_raw.clamp(0, n_kb), c1_raw.clamp(0, n_kb)
    count = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
    hits = (count > 0) & (r1 > r0) & (c1 > c0)
    inside = (r0_raw >= 0) & (r1_raw <= n_qb) & (c0_raw >= 0) & (c1_raw <= n_kb)
    return hits, inside & (count == (r1 - r0) * (c1 - c0))


def _selection_range(sel, q_lo, q_hi, k_lo, k_hi) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether a pair selection can hold for some pair of each tile pair, and whether it holds for every pair."""
    gap_min = _floor_div(q_lo, sel.div)[:, :, None] - _floor_div(k_hi, sel.div)[:, None, :]
    gap_max = _floor_div(q_hi, sel.div)[:, :, None] - _floor_div(k_lo, sel.div)[:, None, :]
    some = torch.ones_like(gap_min, dtype=torch.bool)
    every = torch.ones_like(some)
    if sel.lo is not None:
        some, every = some & (gap_max >= sel.lo), every & (gap_min >= sel.lo)
    if sel.hi is not None:
        some, every = some & (gap_min < sel.hi), every & (gap_max < sel.hi)
    if sel.key_below is not None:
        some, every = some & (k_lo < sel.key_below)[:, None, :], every & (k_hi < sel.key_below)[:, None, :]
    return some, every


def tile_classes(spec: AttentionSpec, q_pos: torch.Tensor, k_pos: torch.Tensor, block_m: int,
                 block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``visible, full [S, B, nQT, nKT]``: per segment (one for a spec without segments), the tile pairs that
    may hold a visible pair the segment owns, and those where every pair is visible and owned by it."""
    q_lo, q_hi = tile_bounds(q_pos, block_m)
    k_lo, k_hi = tile_bounds(k_pos, block_n)
    q_lo3, q_hi3, k_lo3, k_hi3 = q_lo[:, :, None], q_hi[:, :, None], k_lo[:, None, :], k_hi[:, None, :]
    visible = k_lo3 <= q_hi3
    full = k_hi3 <= q_lo3
    # A tile with padding rows or columns (past the end, position sentinel) is never full.
    full = full & (q_hi3 > -BIG) & (k_lo3 < BIG)
    if q_pos.shape[1] % block_m:
        full[:, -1, :] = False
    if k_pos.shape[1] % block_n:
        full[:, :, -1] = False
    if spec.window is not None:
        near = (q_lo3 - k_hi3) < spec.window
        sink = ((k_hi >= 0) & (k_lo < spec.sink_tokens))[:, None, :]
        visible = visible & (near | sink)
        full = full & ((q_hi3 - k_lo3) < spec.window)
    if spec.block_mask is not None:
        hits, all_set = _block_mask_counts(spec, q_lo, q_hi, k_lo, k_hi)
        visible, full = visible & hits, full & all_set
    if not spec.segments:
        return visible[None], (visible & full)[None]
    ranges = [_selection_range(seg.select, q_lo, q_hi, k_lo, k_hi) for seg in spec.segments]
    per_visible, per_full = [], []
    later_possible = torch.zeros_like(visible)
    for some, every in reversed(ranges):  # the last segment selecting a pair owns it
        per_visible.append(visible & some)
        per_full.append(visible & full & every & ~later_possible)
        later_possible = later_possible | some
    return torch.stack(per_visible[::-1]), torch.stack(per_full[::-1])


def _lists(visible: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``full_count, count [...]`` and indices ``[..., n]`` of the True entries of ``visible [..., n]``, the ``full``
    ones first, each group ascending; entries past ``count`` are unspecified. No sort: each tile's place is a
    cumulative count within its group, and the invisible ones go to a spare column that is cut off."""
    n = visible.shape[-1]
    partial = visible & ~full
    full_count = full.sum(-1, dtype=torch.int32)
    count = visible.sum(-1, dtype=torch.int32)
    place = torch.where(full, full.cumsum(-1) - 1, full_count[..., None] + partial.cumsum(-1) - 1)
    place = torch.where(visible, place, torch.full_like(place, n))
    dtype = torch.int16 if n <= torch.iinfo(torch.int16).max else torch.int32
    index = torch.zeros(*visible.shape[:-1], n + 1, dtype=dtype, device=visible.device)
    tiles = torch.arange(n, dtype=dtype, device=visible.device).expand_as(place)
    index.scatter_(-1, place, tiles)
    return full_count, count, index[..., :n].contiguous()


def build_schedule(spec: AttentionSpec, q_pos: torch.Tensor, k_pos: torch.Tensor, block_m: int,
                   block_n: int) -> TileSchedule:
    """The tile lists for ``q_pos [B, Tq]`` and ``k_pos [B, Tk]`` (int) under ``spec``."""
    visible, full = tile_classes(spec, q_pos.to(torch.int64), k_pos.to(torch.int64), block_m, block_n)
    kv_full, kv_count, kv_index = _lists(visible, full)
    q_full, q_count, q_index = _lists(visible.transpose(-1, -2), full.transpose(-1, -2))
    return TileSchedule(block_m, block_n, kv_full, kv_count, kv_index, q_full, q_count, q_index)


def schedule_key(spec: AttentionSpec) -> tuple:
    """What of a spec the tile lists depend on (the block mask by identity: a tensor is not hashable by value)."""
    return (spec.window, spec.sink_tokens, spec.block_size, id(spec.block_mask),
            tuple(seg.select for seg in spec.segments))


_SCHEDULES: OrderedDict = OrderedDict()


def _tensor_key(t: torch.Tensor) -> tuple:
    # Memory, layout and version: the views a model makes of its position ids per layer (``q_pos[:, 0:]``) differ as
    # objects but share these, and an in-place change moves the version (views share their base's counter).
    # Inference tensors (lce's evaluation runs under torch.inference_mode) have no version counter; outside inference
    # mode they cannot be changed in place at all, and nothing in lce changes position ids in place inside it.
    version = None if t.is_inference() else t._version
    return t.data_ptr(), tuple(t.shape), t.stride(), version, t.dtype, t.device


def cached_schedule(spec: AttentionSpec, q_pos: torch.Tensor, k_pos: torch.Tensor, block_m: int,
                    block_n: int) -> TileSchedule:
    """``build_schedule``, reused while the same positions (same memory, layout and version) and an equivalent spec
    come back, as they do for every layer of one forward. The entry holds the position tensors and the block mask, so
    their memory cannot be freed and reused by other values while it lives."""
    key = (_tensor_key(q_pos), _tensor_key(k_pos), block_m, block_n, schedule_key(spec))
    entry = _SCHEDULES.get(key)
    if entry is not None and entry[2] is spec.block_mask:
        _SCHEDULES.move_to_end(key)
        return entry[3]
    schedule = build_schedule(spec, q_pos, k_pos, block_m, block_n)
    _SCHEDULES[key] = (q_pos, k_pos, spec.block_mask, schedule)
    while len(_SCHEDULES) > SCHEDULES_KEPT:
        _SCHEDULES.popitem(last=False)
    return schedule
