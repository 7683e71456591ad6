"""Attention over position-remapped segments: the reference for DCA, Self-Extend, ReRoPE and StreamingLLM.

These methods keep RoPE but change the relative position seen by each (query, key) pair. Each one is a small set of
segments; a segment rotates queries at ``q_map(i)`` and keys at ``k_map(j)`` (absolute positions ``i``, ``j``) and
owns the pairs its ``select(i, j)`` picks, so its logits are ``R(q_map(i)) q_i . R(k_map(j)) k_j``, which depend on
``q_map(i) - k_map(j)`` only. Scores of all segments are merged *before* one softmax (exact, unlike merging
separately normalised attention outputs with detached weights).

``segmented_attention`` materialises ``[B, H, block, Tk]`` scores one query block at a time, so memory grows with
``T * block`` rather than ``T^2`` (in training too: blocks are recomputed in the backward pass); with
``block >= Tq`` it is the plain eager reference. Keys are rotated once per segment (``O(T)`` memory).

Without autograd on CPU (evaluation) each block runs fused SDPA calls per segment over the key columns that segment
selects, merged by log-sum-exp weights: the same softmax, without scores in memory and without scoring a pair once per
segment. When the segments select pairs by data (``lce.kernels.attention.spec.PairSelect``) and positions are
consecutive (an unpadded batch), each query's keys are one contiguous run computed from the rule itself, and a block's
selection is cut into a causal tile, full runs and a ragged edge (``staircase_pieces``): no ``[Tq, Tk]`` tensor is
built and a method costs what plain causal attention costs on the pairs it scores (``_staircase_attention``).
Otherwise the masks of a block are formed (``_block_merged``). Under autograd the segment logits are merged before
one explicit softmax (``_block``), whose gradient is exact; on CUDA lce's fused Triton kernel
(``lce.kernels.attention``) does both.

A sparse attention variant's restriction (``visible=``, ``lce.attention.plan.Restriction``) hides further pairs, and
each query block then scores only the key columns the restriction's block map and causality leave
(``lce.attention.blockwise.key_columns``): DCA or ReRoPE under a sliding window of ``W`` cost ``O(T * (W + block))``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

from lce.attention.blockwise import allowed_pairs, key_columns
from lce.errors import LceError
from lce.kernels.attention import spec

if TYPE_CHECKING:  # annotations only: importing lce.posenc here would import every method (a cycle)
    from lce.attention.plan import Restriction
    from lce.hf.patch import PatchTarget
    from lce.posenc.rotation import Rotation

PositionMap = Callable[[torch.Tensor], torch.Tensor]
PairSelect = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Segment:
    """One way of rotating a (query, key) pair.

    Attributes:
        q_map: absolute query positions ``[B, Tq]`` -> rotation positions (same shape).
        k_map: absolute key positions ``[B, Tk]`` -> rotation positions.
        select: ``(i [B, Tq, 1], j [B, 1, Tk]) -> bool [B, Tq, Tk]``: the causal pairs this segment scores.
            Segments must not overlap; a causal pair no segment selects is masked out.
    """

    q_map: PositionMap
    k_map: PositionMap
    select: PairSelect


def identity(positions: torch.Tensor) -> torch.Tensor:
    return positions


def fused_segments(segments: tuple, rotation: Rotation, window: int | None = None, sink_tokens: int = 0):
    """A segment method as data for lce's fused kernel (``lce.attention.plan.FusedAttention``): its segments written
    as ``lce.kernels.attention.spec.Segment`` (``lce.kernels.attention.segments``, tested equal to the callables the
    method's ``segmented_attention`` reference uses) and the layer's rotation. Without rotation every segment gives
    the same logits, so only the pairs they select matter: all causal pairs for DCA, Self-Extend and ReRoPE, the
    window and sinks (passed as ``window``/``sink_tokens``) for StreamingLLM."""
    from lce.attention.plan import FusedAttention
    from lce.kernels.attention import Rotary

    if rotation.rotary_dim == 0:  # a layer that does not rotate (SmolLM3's NoPE layers): every segment scores alike
        return FusedAttention(window=window, sink_tokens=sink_tokens)
    return FusedAttention(segments=tuple(segments), rotary=Rotary.from_rotation(rotation), window=window,
                          sink_tokens=sink_tokens)


def use_segment_method(target: PatchTarget, method: str, attend: Callable[..., torch.Tensor],
                       fused_for: Callable[[Rotation], object], takes_visible: bool = True) -> None:
    """Patch every layer of ``target`` with a segment method, each layer rotating with its own rotation (Gemma3's
    per-layer-type frequencies, SmolLM3's NoPE layers).

    Args:
        method: the position encoding's name (errors, the attention function's name).
        attend: ``(rotation, query, key, value, q_pos, k_pos, scaling, attention_mask, visible, softcap) -> [B, Tq, H,
            D]``, the method's attention on one layer (``visible``: a restriction or None; ``softcap``: the model's
            attention-logit soft-cap or None).
        fused_for: a layer's rotation -> its ``FusedAttention`` (the same method as data for the fused kernel).
        takes_visible: whether ``attend`` honours an attention variant's restriction; if not, combining the method
            with a sparse variant is refused when the model is patched.
    """
    rotations = target.layer_rotations_in_attention(method)

    def kernel_for(layer_index, module):
        rotation = rotations[layer_index]

        def kernel(module, query, key, value, attention_mask, scaling, dropout, q_pos, k_pos, visible=None,
                   **kwargs):
            if dropout:
                raise LceError(f"posenc={method} has no attention dropout; got dropout={dropout} "
                               "(set attention_dropout=0)")
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            return attend(rotation, query, key, value, q_pos, k_pos, scale, attention_mask, visible,
                          kwargs.get("softcap")), None

        if takes_visible:
            return kernel

        def kernel_without_visible(module, query, key, value, attention_mask, scaling, dropout, q_pos, k_pos,
                                   **kwargs):
            return kernel(module, query, key, value, attention_mask, scaling, dropout, q_pos, k_pos, **kwargs)

        return kernel_without_visible

    target.use_kernel(method, kernel_for, handles={"softcap"},
                      fused_for_layer=lambda layer_index, module: fused_for(rotations[layer_index]))


def segmented_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: list[Segment],
    rotation: Rotation,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    block_size: int = 1024,
    visible: Restriction | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention whose logits come from the segment owning each pair.

    Args:
        query: ``[B, H, Tq, D]`` unrotated queries (already scaled per position if log-n applies).
        key, value: ``[B, HKV, Tk, D]`` unrotated keys and values (``H`` a multiple of ``HKV``).
        segments: the method's segments.
        rotation: the model's rotary embedding.
        q_pos, k_pos: ``[B, Tq]``, ``[B, Tk]`` absolute positions.
        scaling: the softmax scale (``1/sqrt(D)``).
        attention_mask: ``[B, 1, Tq, Tk]`` boolean (True = may attend), or None; combined with causality.
        block_size: query rows scored at once.
        visible: a sparse variant's restriction of the pairs that may attend, or None.
        softcap: soft-cap every logit to ``softcap * tanh(logit / softcap)`` before the softmax (Gemma 2), or None.

    Returns:
        ``[B, Tq, H, D]`` in ``query.dtype``; rows with no visible key are 0.
    """
    heads, tq = query.shape[1], query.shape[2]
    groups = heads // key.shape[1]
    rotated: dict[int, torch.Tensor] = {}  # segments sharing a key map (all three of DCA's) share its rotated keys
    for seg in segments:
        if id(seg.k_map) not in rotated:
            rotated[id(seg.k_map)] = rotation.apply(key, seg.k_map(k_pos)).repeat_interleave(groups, dim=1)
    keys = [rotated[id(seg.k_map)] for seg in segments]
    values = value.repeat_interleave(groups, dim=1)
    if staircase_applies(segments, query, q_pos, k_pos, attention_mask, visible, softcap):
        return _staircase_attention(query, q_pos, k_pos, keys, values, segments, rotation, scaling)
    # Under autograd each block is recomputed in the backward pass, so training keeps one block of scores, not T^2.
    recompute = torch.is_grad_enabled() and tq > block_size
    blocks = []
    for start in range(0, tq, block_size):
        stop = min(start + block_size, tq)
        mask = attention_mask[:, :, start:stop, :] if attention_mask is not None else None
        # Without a restriction every key column is scored, as before restrictions existed (same summation order).
        columns = key_columns(visible, q_pos[:, start:stop], k_pos) if visible is not None else slice(None)
        args = (query[:, :, start:stop], q_pos[:, start:stop], k_pos, keys, values, mask, segments, rotation, scaling,
                columns, visible)
        if torch.is_grad_enabled() or query.device.type != "cpu" or softcap is not None:
            args += (softcap,)
            blocks.append(checkpoint(_block, *args, use_reentrant=False) if recompute else _block(*args))
        else:
            blocks.append(_block_merged(*args))
    return torch.cat(blocks, dim=2).transpose(1, 2)


def _block(query, q_pos, k_pos, keys, values, mask, segments, rotation, scaling, columns, visible,
           softcap=None) -> torch.Tensor:
    """Attention of one query block ``[B, H, Tb, D]`` over its key columns: segment logits merged, one softmax."""
    score_dtype = torch.promote_types(query.dtype, torch.float32)  # softmax in at least fp32
    k_pos, keys, values = k_pos[:, columns], [k[:, :, columns] for k in keys], values[:, :, columns]
    if mask is not None:
        mask = mask[..., columns]
    i, j = q_pos[:, :, None], k_pos[:, None, :]
    allowed = allowed_pairs(q_pos, k_pos, mask, visible)  # [B, 1 or H, Tb, Tk]
    scores = torch.full((*query.shape[:3], k_pos.shape[1]), float("-inf"), device=query.device, dtype=score_dtype)
    for seg, k_rot in zip(segments, keys):
        q_rot = rotation.apply(query, seg.q_map(q_pos))
        chosen = seg.select(i, j)[:, None] & allowed
        logits = torch.matmul(q_rot, k_rot.transpose(-1, -2)).to(score_dtype) * scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        scores = torch.where(chosen, logits, scores)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows (left padding) attend to nothing
    return torch.matmul(probs.to(values.dtype), values)


def _pairs_argument(chosen: torch.Tensor, dtype: torch.dtype) -> tuple[bool, torch.Tensor | None]:
    """How the fused kernel learns which pairs of a span it scores, as ``(is_causal, bias)``: nothing for a span the
    segment covers entirely, ``is_causal`` for a square causal one (both several times faster than a bias; every span
    of DCA's chunk-aligned blocks is one of the two), else a ``[..., b, n]`` bias of 0 and ``-inf``."""
    if bool(chosen.all()):
        return False, None
    rows, cols = chosen.shape[-2:]
    if rows == cols and bool((chosen == torch.ones(rows, cols, dtype=torch.bool, device=chosen.device).tril()).all()):
        return True, None
    return False, torch.zeros(chosen.shape, dtype=dtype, device=chosen.device).masked_fill_(~chosen, float("-inf"))


def _block_merged(query, q_pos, k_pos, keys, values, mask, segments, rotation, scaling, columns, visible):
    """``_block`` without autograd on CPU: per segment one fused SDPA call (PyTorch's CPU flash kernel, which returns
    the log-sum-exp) over the key columns that segment selects, merged by log-sum-exp weights. That is the same
    softmax (``softmax`` over a union of disjoint sets = LSE-weighted sum of the per-set softmaxes), computed without
    scores in memory and without scoring a pair once per segment; the weights would need the LSE's gradient, hence
    inference only (under autograd ``_block`` runs)."""
    k_pos, keys, values = k_pos[:, columns], [k[:, :, columns] for k in keys], values[:, :, columns]
    if mask is not None:
        mask = mask[..., columns]
    i, j = q_pos[:, :, None], k_pos[:, None, :]
    allowed = allowed_pairs(q_pos, k_pos, mask, visible)  # [B, 1 or H, Tb, Tk]
    outs, lses = [], []
    for seg, k_rot in zip(segments, keys):
        chosen = seg.select(i, j)[:, None] & allowed
        used = chosen.flatten(0, 2).any(dim=0).nonzero().flatten()
        if used.numel() == 0:
            continue
        cols = slice(int(used[0]), int(used[-1]) + 1)  # a contiguous span holding every selected column
        chosen = chosen[..., cols]
        q_rot = rotation.apply(query, seg.q_map(q_pos))
        causal, bias = _pairs_argument(chosen, query.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_rot, k_rot[:, :, cols], values[:, :, cols], 0.0, causal, attn_mask=bias, scale=scaling)
        # The kernel reports lse = 0 and output 0 for a row with no selected key: mark such rows -inf (weight 0).
        lses.append(lse.float().masked_fill(~chosen.any(dim=-1).expand_as(lse), float("-inf")))
        outs.append(out)
    return _merge_by_lse(outs, lses, query, values.shape[-1])


# Query rows per call of the staircase path: large enough that a call amortises its overhead, small enough that the
# ragged pieces' biases (at most rows x rows floats) stay small.
STAIRCASE_ROWS = 1024


def staircase_applies(segments, query, q_pos, k_pos, attention_mask, visible, softcap) -> bool:
    """Whether ``_staircase_attention`` computes this call: inference on CPU, segments whose pair selection is data
    (``spec.PairSelect``), no padding mask, restriction or soft-cap, and every batch row at the
    same consecutive positions (queries and keys)."""
    if torch.is_grad_enabled() or query.device.type != "cpu" or attention_mask is not None or visible is not None:
        return False
    if softcap is not None or not all(isinstance(seg.select, spec.PairSelect) for seg in segments):
        return False
    return _consecutive(q_pos) and _consecutive(k_pos)


def _consecutive(positions: torch.Tensor) -> bool:
    """``[B, T]`` positions are ``p0, p0 + 1, ...`` in every row, the same ``p0`` for all."""
    first = positions[:1, :1]
    steps = torch.arange(positions.shape[1], device=positions.device, dtype=positions.dtype)
    return bool((positions == first + steps).all())


def staircase_rows(segments) -> int:
    """Query rows per block: at most ``STAIRCASE_ROWS`` and at most a band's width (so a block's own keys form one
    causal tile), dividing every chunk stride (so a chunk-aligned block stays inside one chunk)."""
    rows = STAIRCASE_ROWS
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
    """One fused-attention call of a staircase block: key columns ``[start, stop)`` and how their pairs are chosen:
    all (``bias`` None, not ``causal``), the lower triangle of a square (``causal``), or a ``[b, n]`` 0/-inf bias."""

    start: int
    stop: int
    causal: bool = False
    bias: torch.Tensor | None = None
    empty_rows: torch.Tensor | None = None  # bool [b]: rows the bias leaves without a key


def staircase_pieces(start: torch.Tensor, stop: torch.Tensor, dtype: torch.dtype) -> list[Piece]:
    """Cut a block's selection (each row ``r`` the columns ``[start[r], stop[r])``, both nondecreasing in ``r``, as
    any ``PairSelect`` gives consecutive queries) into pieces without masks wherever possible:

    1. the causal tile: when row ``r`` ends at ``c + r + 1`` and every row starts by ``c``, columns ``[c, c + b)``
       are exactly the lower triangle (a block's own keys in plain causal attention, DCA's intra-chunk segment);
    2. the columns every remaining row selects (DCA's successive and inter-chunk chunks, the keys far behind a
       band): one full piece;
    3. the ragged columns on either side (the edge of a band): a bias of 0 and -inf.
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
        if hi <= lo:
            continue
        columns = torch.arange(lo, hi, device=start.device, dtype=start.dtype)
        chosen = (columns >= start[:, None]) & (columns < stop[:, None])  # [b, hi - lo]
        if not bool(chosen.any()):
            continue
        bias = torch.zeros(chosen.shape, dtype=dtype, device=chosen.device).masked_fill_(~chosen, float("-inf"))
        pieces.append(Piece(lo, hi, bias=bias, empty_rows=~chosen.any(dim=-1)))
    return pieces


def _staircase_attention(query, q_pos, k_pos, keys, values, segments, rotation, scaling) -> torch.Tensor:
    """``segmented_attention`` for inference on CPU without any ``[Tq, Tk]`` tensor: each block of queries, per
    segment, runs PyTorch's fused CPU attention (which returns the log-sum-exp) over the pieces of its selection
    (``staircase_pieces``), and the pieces are merged by their log-sum-exp weights, the same softmax over the union
    of disjoint sets. Every selected pair is scored once; no pair is scored twice; a block costs what plain causal
    attention costs on the keys it selects. Query and key positions are consecutive (``staircase_applies``).

    Args: as ``segmented_attention``, with ``keys`` ``[B, H, Tk, D]`` per segment (rotated, heads repeated) and
    ``values`` ``[B, H, Tk, D]``. Returns ``[B, Tq, H, D]``.
    """
    tq, tk = query.shape[2], values.shape[2]
    q0, k0 = int(q_pos[0, 0]), int(k_pos[0, 0])
    whole = _whole_causal_segment(segments, q0, tq, k0, tk)
    if whole is not None:  # the method's windows cover the sequence: plain causal attention, one call
        seg, k_rot = segments[whole], keys[whole]
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            rotation.apply(query, seg.q_map(q_pos)), k_rot, values, 0.0, tq > 1, scale=scaling)
        return out.transpose(1, 2)
    rows = staircase_rows(segments)
    blocks = []
    for first in range(0, tq, rows):
        last = min(first + rows, tq)
        i = torch.arange(q0 + first, q0 + last)
        block_pos = q_pos[:, first:last]
        outs, lses = [], []
        for seg, k_rot in zip(segments, keys):
            pieces = staircase_pieces(*selected_spans(seg.select, i, k0, tk), query.dtype)
            if not pieces:
                continue
            q_rot = rotation.apply(query[:, :, first:last], seg.q_map(block_pos))
            for piece in pieces:
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q_rot, k_rot[:, :, piece.start:piece.stop], values[:, :, piece.start:piece.stop], 0.0,
                    piece.causal, attn_mask=piece.bias, scale=scaling)
                lse = lse.float()
                if piece.empty_rows is not None and bool(piece.empty_rows.any()):
                    lse = lse.masked_fill(piece.empty_rows, float("-inf"))  # the kernel reports 0 for such rows
                outs.append(out)
                lses.append(lse)
        blocks.append(_merge_by_lse(outs, lses, query[:, :, first:last], values.shape[-1]))
    return torch.cat(blocks, dim=2).transpose(1, 2)


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


def _merge_by_lse(outs: list[torch.Tensor], lses: list[torch.Tensor], query: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax outputs over disjoint key sets ``[B, H, b, D]`` merged into the softmax over their union, from each
    set's log-sum-exp ``[B, H, b]`` (-inf: the set is empty for that row, weight 0)."""
    if not outs:
        return query.new_zeros(*query.shape[:3], dim)
    if len(outs) == 1:
        return outs[0] if bool(torch.isfinite(lses[0]).all()) else outs[0] * torch.isfinite(lses[0])[..., None]
    lse = torch.stack(lses)  # [S, B, H, b]
    top = lse.amax(dim=0)
    weights = torch.exp(lse - torch.where(torch.isfinite(top), top, 0.0))  # rows nothing selects: all 0
    total = weights.sum(dim=0).clamp_min(torch.finfo(torch.float32).tiny)
    merged = sum(w[..., None] * o.float() for w, o in zip(weights, outs)) / total[..., None]
    return merged.to(query.dtype)
