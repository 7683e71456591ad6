"""The CPU inference path of segment attention: a call as causal tiles, full runs and band-edge triangles.

When positions are consecutive (an unpadded batch) and nothing is differentiated, each query's keys under a segment
are one contiguous run computed from the segment's rule itself, and a block of queries' selection is cut into a causal
tile, full runs and the triangles at a band's edges (``staircase_pieces``); each piece is one call of PyTorch's fused
CPU attention (which returns the log-sum-exp) and the pieces are merged by their log-sum-exp weights, the same softmax
over the union of disjoint sets (``merge_by_lse``). No ``[Tq, Tk]`` tensor is built, no mask is passed, and a method
costs what plain causal attention costs on the pairs it scores. ``lce.core.segments.segmented_attention`` is the
reference it is tested against.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lce.kernels.attention import spec

# Query rows per call of the staircase path: large enough that a call amortises its overhead, small enough that the
# ragged pieces' biases (at most rows x rows floats) stay small.
STAIRCASE_ROWS = 1024


def staircase_applies(segments, query, q_pos, k_pos, attention_mask, visible, softcap) -> bool:
    """Whether ``staircase_attention`` computes this call: inference on CPU, no padding mask, restriction or
    soft-cap, and every batch row at the same consecutive positions (queries and keys)."""
    if torch.is_grad_enabled() or query.device.type != "cpu" or attention_mask is not None or visible is not None:
        return False
    return softcap is None and _consecutive(q_pos) and _consecutive(k_pos)


def _consecutive(positions: torch.Tensor) -> bool:
    """``[B, T]`` positions are ``p0, p0 + 1, ...`` in every row, the same ``p0`` for all."""
    first = positions[:1, :1]
    steps = torch.arange(positions.shape[1], device=positions.device, dtype=positions.dtype)
    return bool((positions == first + steps).all())


def staircase_rows(segments, most_rows: int | None = None) -> int:
    """Query rows per block: at most ``most_rows`` (``STAIRCASE_ROWS``) and at most a band's width (so a block's own
    keys form one causal tile), dividing every chunk stride (so a chunk-aligned block stays inside one chunk)."""
    rows = most_rows or STAIRCASE_ROWS
    for seg in segments:
        select = seg.select
        if select.div > 1:  # lo and hi count chunks: the chunk stride sets the rows
            rows = max(r for r in range(1, min(rows, select.div) + 1) if select.div % r == 0)
            continue
        for width in (select.lo, select.hi):
            if width is not None and width > 0:
                rows = min(rows, max(width, 64))  # narrower bands: ragged pieces with a bias, still exact
    return rows


def selected_spans(select: spec.PairSelect, i: torch.Tensor, k0: int, tk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The key columns each query selects, as half-open spans ``[start, stop)`` of key indices ``[b]`` each.

    For consecutive keys at positions ``k0 .. k0 + tk - 1``, a ``PairSelect`` (``lo <= i // d - j // d < hi``,
    ``j < key_below``) and causality (``j <= i``) leave every query ``i`` one contiguous run of keys:
    ``j // d > i // d - hi`` gives ``j >= (i // d - hi + 1) d`` and ``j // d <= i // d - lo`` gives
    ``j < (i // d - lo + 1) d``. An empty selection has ``stop <= start``.
    """
    d = select.div
    low = torch.full_like(i, k0)
    high = torch.minimum(i + 1, torch.full_like(i, k0 + tk))
    if select.hi is not None:
        low = torch.maximum(low, (torch.div(i, d, rounding_mode="floor") - select.hi + 1) * d)
    if select.lo is not None:
        high = torch.minimum(high, (torch.div(i, d, rounding_mode="floor") - select.lo + 1) * d)
    if select.key_below is not None:
        high = high.clamp(max=select.key_below)
    return low - k0, high - k0


@dataclass(frozen=True)
class Piece:
    """One fused-attention call of a staircase block: the block's query rows ``[first, last)`` (``last`` None: to
    the end) against key columns ``[start, stop)``, their pairs chosen as: all (no flag, no bias), the lower
    triangle of a square (``causal``), the upper triangle of a square (``flipped``: rows and columns reversed make it
    the lower one), or a ``[rows, stop - start]`` 0/-inf ``bias`` (``empty_rows``: the rows it leaves without a
    key)."""

    start: int
    stop: int
    first: int = 0
    last: int | None = None
    causal: bool = False
    flipped: bool = False
    bias: torch.Tensor | None = None
    empty_rows: torch.Tensor | None = None


def staircase_pieces(start: torch.Tensor, stop: torch.Tensor, dtype: torch.dtype) -> list[Piece]:
    """Cut a block's selection (each row ``r`` the columns ``[start[r], stop[r])``, both nondecreasing in ``r``, as
    any ``PairSelect`` gives consecutive queries) into pieces without masks wherever possible:

    1. the causal tile: when row ``r`` ends at ``c + r + 1`` and every row starts by ``c``, columns ``[c, c + b)``
       are exactly the lower triangle (a block's own keys in plain causal attention, DCA's intra-chunk segment);
    2. the columns every remaining row selects (DCA's successive and inter-chunk chunks, the keys far behind a
       band): one full piece;
    3. the ragged columns on either side (the edges of a band): each a triangle where the band moves one key per
       query (``_edge_piece``), else a bias of 0 and -inf.
    """
    rows = start.shape[0]
    live = stop > start
    if not bool(live.any()):
        return []
    pieces: list[Piece] = []
    end = int(stop.max())
    corner = int(stop[0]) - 1
    steps = torch.arange(rows, device=stop.device, dtype=stop.dtype)
    if corner >= 0 and bool(live[0]) and bool((stop - corner - 1 == steps).all()) and bool((start <= corner).all()):
        pieces.append(Piece(corner, corner + rows, causal=True))
        end = corner
    stop = stop.clamp(max=end)
    live = stop > start
    if not bool(live.any()):
        return pieces
    begin = int(start[live].min())
    full_lo, full_hi = int(start.max()), int(stop.min())
    if full_lo < full_hi:
        spans = [(begin, full_lo), (full_hi, end)]
        pieces.append(Piece(full_lo, full_hi))
    else:
        spans = [(begin, end)]
    for lo, hi in spans:
        if hi > lo:
            piece = _edge_piece(start.clamp(lo, hi), stop.clamp(lo, hi), lo, hi, dtype)
            if piece is not None:
                pieces.append(piece)
    return pieces


def _edge_piece(start: torch.Tensor, stop: torch.Tensor, lo: int, hi: int, dtype: torch.dtype) -> Piece | None:
    """The piece for rows selecting ``[start[r], stop[r])`` within columns ``[lo, hi)``. A band's edge moves one key
    per query, so its selected rows are a triangle: ``[lo, lo + k + 1)`` (the far edge of Self-Extend's and ReRoPE's
    remapped segment: causal) or ``[lo + k, hi)`` (the near band's back edge: causal once rows and columns are
    reversed); both run the fused kernel's maskless causal path on half the square, several times faster than a
    bias. Anything else (clamped edges, narrow windows) gets a bias over its live rows."""
    live = (stop > start).nonzero().flatten()
    if live.numel() == 0:
        return None
    first, last = int(live[0]), int(live[-1]) + 1
    start, stop = start[first:last], stop[first:last]
    if last - first == hi - lo == live.numel():
        ramp = torch.arange(lo, hi, device=start.device, dtype=start.dtype)
        if bool((start == lo).all()) and bool((stop == ramp + 1).all()):
            return Piece(lo, hi, first, last, causal=True)
        if bool((stop == hi).all()) and bool((start == ramp).all()):
            return Piece(lo, hi, first, last, flipped=True)
    columns = torch.arange(lo, hi, device=start.device, dtype=start.dtype)
    chosen = (columns >= start[:, None]) & (columns < stop[:, None])  # [last - first, hi - lo]
    bias = torch.zeros(chosen.shape, dtype=dtype, device=chosen.device).masked_fill_(~chosen, float("-inf"))
    return Piece(lo, hi, first, last, bias=bias, empty_rows=~chosen.any(dim=-1))


def _attend_piece(q_rot: torch.Tensor, k_rot: torch.Tensor, values: torch.Tensor, piece: Piece,
                  scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused CPU attention call: ``[B, H, rows, D]`` outputs and their fp32 log-sum-exp ``[B, H, rows]`` (-inf
    for rows without a key). Keys and values keep their KV heads (the fused CPU attention reads head
    ``h // groups``)."""
    q = q_rot[:, :, piece.first:piece.last]
    k, v = k_rot[:, :, piece.start:piece.stop], values[:, :, piece.start:piece.stop]
    if piece.flipped:
        q, k, v = q.flip(2), k.flip(2), v.flip(2)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, piece.causal or piece.flipped, attn_mask=piece.bias, scale=scaling)
    if piece.flipped:
        out, lse = out.flip(2), lse.flip(-1)
    lse = lse.float()
    if piece.empty_rows is not None and bool(piece.empty_rows.any()):
        lse = lse.masked_fill(piece.empty_rows, float("-inf"))  # PyTorch's fused CPU attention reports 0 for such rows
    return out, lse


@dataclass(frozen=True)
class StaircasePlan:
    """What ``staircase_attention`` computes for one call geometry, the same in every layer of a forward.

    Attributes:
        whole: the index of the one segment that selects every causal pair (one plain causal call), or None.
        far: ``segment index -> first query row`` of the segments computed as one causal square
            (``_far_square_start``).
        blocks: ``(first, last, ((segment index, pieces), ...))`` per block of query rows, for the other segments.
    """

    whole: int | None
    far: dict
    blocks: tuple


def staircase_plan(segments: tuple, q0: int, k0: int, tq: int, tk: int, dtype: torch.dtype) -> StaircasePlan:
    """The plan of a call with ``tq`` queries at ``q0, ...`` and ``tk`` keys at ``k0, ...``, computed once and kept
    (it depends on the geometry only, not on the layer: the layers of a forward share it)."""
    return _plan(segments, q0, k0, tq, tk, dtype, STAIRCASE_ROWS)


@functools.lru_cache(maxsize=16)
def _plan(segments, q0, k0, tq, tk, dtype, most_rows: int) -> StaircasePlan:
    whole = _whole_causal_segment(segments, q0, tq, k0, tk)
    if whole is not None:
        return StaircasePlan(whole, {}, ())
    # A segment owning every pair at distance >= W (Self-Extend's grouped pairs, ReRoPE's far ones) is one causal
    # square: queries from row W - (q0 - k0) on against keys from 0, one call for all blocks (no triangle per block).
    far = {index: start for index, seg in enumerate(segments)
           if (start := _far_square_start(seg.select, q0 - k0, tq)) is not None}
    rows = staircase_rows([seg for index, seg in enumerate(segments) if index not in far], most_rows)
    blocks = []
    for first in range(0, tq, rows):
        last = min(first + rows, tq)
        i = torch.arange(q0 + first, q0 + last)
        chosen = tuple((index, tuple(pieces)) for index, seg in enumerate(segments) if index not in far
                       and (pieces := staircase_pieces(*selected_spans(seg.select, i, k0, tk), dtype)))
        blocks.append((first, last, chosen))
    return StaircasePlan(None, far, tuple(blocks))


def staircase_attention(query, key, value, q0: int, k0: int, segments, rotation, scaling) -> torch.Tensor:
    """``segmented_attention`` for inference on CPU without any ``[Tq, Tk]`` tensor: each block of queries, per
    segment, runs PyTorch's fused CPU attention (which returns the log-sum-exp) over the pieces of its selection
    (``staircase_plan``), and the pieces are merged by their log-sum-exp weights, the same softmax over the union
    of disjoint sets. Every selected pair is scored once; no pair is scored twice.

    Args: ``query [B, H, Tq, D]``, ``key``/``value [B, HKV, Tk, D]`` unrotated (the fused kernel reads grouped KV
    heads itself: query head ``h`` uses KV head ``h // (H / HKV)``, no copies), at the consecutive positions
    ``q0, q0 + 1, ...`` and ``k0, ...`` (``staircase_applies``); queries and keys are rotated once per distinct map,
    with cos/sin tables the layers of a forward share (``Rotation.apply_consecutive``). Returns ``[B, Tq, H, D]``.
    """
    tq, tk = query.shape[2], value.shape[2]
    plan = staircase_plan(tuple(segments), q0, k0, tq, tk, query.dtype)
    rotated = {}  # (which, map) -> rotated queries or keys: segments sharing a map share them

    def rotate(which, x, position_map, start):
        if (which, position_map) not in rotated:
            rotated[which, position_map] = rotation.apply_consecutive(x, position_map, start)
        return rotated[which, position_map]

    def rotated_pair(index):
        seg = segments[index]
        return rotate("q", query, seg.q_map, q0), rotate("k", key, seg.k_map, k0)

    if plan.whole is not None:  # the method's windows cover the sequence: plain causal attention, one call
        out, _ = _attend_piece(*rotated_pair(plan.whole), value, Piece(0, tk, causal=tq > 1), scaling)
        return out.transpose(1, 2)
    far_parts = []
    for index, start in plan.far.items():
        q_rot, k_rot = rotated_pair(index)
        far_parts.append((start, *_attend_piece(q_rot[:, :, start:], k_rot[:, :, :tq - start], value,
                                                Piece(0, tq - start, causal=True), scaling)))
    out = query.new_empty(query.shape[0], tq, query.shape[1], value.shape[-1])  # [B, Tq, H, D]: no cat, no copy
    for first, last, chosen in plan.blocks:
        parts = [(slice(lo - first, None), far_out[:, :, lo - start:last - start],
                  far_lse[..., lo - start:last - start])
                 for start, far_out, far_lse in far_parts if (lo := max(first, start)) < last]
        for index, pieces in chosen:
            q_rot, k_rot = rotated_pair(index)
            parts += [(slice(piece.first, piece.last), *_attend_piece(q_rot[:, :, first:last], k_rot, value, piece,
                                                                      scaling))
                      for piece in pieces]
        out[:, first:last] = merge_by_lse(parts, query[:, :, first:last], value.shape[-1]).transpose(1, 2)
    return out


def _far_square_start(select: spec.PairSelect, offset: int, tq: int) -> int | None:
    """For a rule selecting exactly the pairs at distance ``i - j >= W`` (no other bound), the first query row
    ``W - offset`` from which, with keys from index 0, its selection is the lower triangle of a square (row ``r``
    sees keys ``[0, r - W + offset]``); None when the rule has other bounds or the square would not start at a
    row of this call (``offset = q0 - k0``: queries continuing a cache further than ``W``)."""
    if select.div != 1 or select.hi is not None or select.key_below is not None or (select.lo or 0) < 1:
        return None
    start = select.lo - offset
    return start if 0 <= start < tq else None


def _whole_causal_segment(segments, q0: int, tq: int, k0: int, tk: int) -> int | None:
    """The index of the segment that selects every causal pair when it is the only one selecting any (DCA within
    one chunk, Self-Extend and ReRoPE within their window, sinks within the cache) and the queries are the last
    ``tq`` of the ``tk`` keys, else None."""
    if q0 - k0 != tk - tq or not (tq == tk or tq == 1):
        return None
    i = torch.arange(q0, q0 + tq)
    whole = None
    for index, seg in enumerate(segments):
        start, stop = selected_spans(seg.select, i, k0, tk)
        if not bool((stop > start).any()):
            continue
        if whole is not None or not bool(((start == 0) & (stop == i - k0 + 1)).all()):
            return None
        whole = index
    return whole


def merge_by_lse(parts: list, query: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax outputs over disjoint key sets merged into the softmax over their union. ``parts``: ``(rows, out,
    lse)`` with ``rows`` a slice of the block's query rows, ``out`` ``[B, H, rows, D]`` and ``lse`` ``[B, H, rows]``
    its log-sum-exp (-inf: the set is empty for that row, weight 0). Returns ``[B, H, b, dim]``; rows no set
    covers are 0."""
    if not parts:
        return query.new_zeros(*query.shape[:3], dim)
    if len(parts) == 1 and parts[0][0] == slice(0, None):
        _, out, lse = parts[0]
        return out if bool(torch.isfinite(lse).all()) else out * torch.isfinite(lse)[..., None]
    top = torch.full(query.shape[:3], float("-inf"), device=query.device)
    for rows, _, lse in parts:
        top[..., rows] = torch.maximum(top[..., rows], lse)
    top = torch.where(torch.isfinite(top), top, 0.0)  # rows nothing selects: every weight 0
    merged = total = None
    for rows, out, lse in parts:
        weight = torch.exp(lse - top[..., rows])
        if merged is None and rows == slice(0, None):  # the first part over every row starts the sums (no zeros)
            merged, total = out * weight[..., None], weight  # fp32 (the weight's dtype), a new tensor
            continue
        if merged is None:
            merged = query.new_zeros(*query.shape[:3], dim, dtype=torch.float32)
            total = torch.zeros(query.shape[:3], device=query.device)
        total[..., rows] += weight
        merged[..., rows, :].addcmul_(out.float(), weight[..., None])  # fp32 operands: the fast path
    return merged.div_(total.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).to(query.dtype)
