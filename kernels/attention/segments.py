"""The segments of lce's position-remapping methods as ``spec.Segment`` data (what ``lce/posenc/*.py`` computes
with callables; ``tests/kernels/attention/test_segments.py`` checks them equal on a grid of positions).

- DCA (An et al. 2024, arXiv:2402.17463, §3; ``lce.posenc.dca``): intra-, successive- and inter-chunk segments, in
  ChunkLlama's code convention (stride ``L = s - w``) or the paper's (stride ``s``).
- Self-Extend (Jin et al. 2024, arXiv:2401.01325, §3; ``lce.posenc.self_extend``): neighbour and grouped.
- ReRoPE (Su 2023; ``lce.posenc.rerope``): near and far.
- StreamingLLM sinks with pos-shift (Xiao et al. 2024, arXiv:2309.17453, §3.2; ``lce.posenc.sinks``): recent and
  sink (pairs neither selects are hidden).
"""

from __future__ import annotations

from lce.kernels.attention.spec import IDENTITY, PairSelect, PositionMap, Segment


def dca_code_segments(chunk_size: int, local_window: int) -> tuple[Segment, ...]:
    """DCA as ChunkLlama codes it: stride ``L = s - w``, keys at ``j mod L``; queries at ``i mod L`` (intra),
    ``min(i mod L + L, s)`` (successive) and ``min(2L - 1, s)`` (inter)."""
    stride = chunk_size - local_window
    in_chunk = PositionMap(mod=stride)
    return (
        Segment(in_chunk, in_chunk, PairSelect(div=stride, lo=0, hi=1)),
        Segment(PositionMap(mod=stride, add=stride, cap=chunk_size), in_chunk, PairSelect(div=stride, lo=1, hi=2)),
        Segment(PositionMap.constant(min(2 * stride - 1, chunk_size)), in_chunk, PairSelect(div=stride, lo=2)),
    )


def dca_paper_segments(chunk_size: int, local_window: int, pretraining_length: int) -> tuple[Segment, ...]:
    """DCA as the paper writes it: stride ``s``, keys at ``j mod s``; queries at ``i mod s`` (intra),
    ``s + (i mod s)`` for the first ``w`` queries of a chunk and ``c - 1`` for the rest (successive), ``c - 1``
    (inter)."""
    s, last = chunk_size, pretraining_length - 1
    in_chunk = PositionMap(mod=s)
    return (
        Segment(in_chunk, in_chunk, PairSelect(div=s, lo=0, hi=1)),
        Segment(PositionMap(mod=s, add=s, below=local_window, otherwise=last), in_chunk, PairSelect(div=s, lo=1, hi=2)),
        Segment(PositionMap.constant(last), in_chunk, PairSelect(div=s, lo=2)),
    )


def dca_segments(geometry) -> tuple[Segment, ...]:
    """The segments of an ``lce.posenc.dca.DcaGeometry`` (read by attribute)."""
    if geometry.convention == "code":
        return dca_code_segments(geometry.chunk_size, geometry.local_window)
    return dca_paper_segments(geometry.chunk_size, geometry.local_window, geometry.pretraining_length)


def self_extend_segments(group_size: int, neighbor_window: int) -> tuple[Segment, ...]:
    """Neighbour pairs (``i - j < W``) at true positions; grouped pairs with query ``i // G + W - W // G`` and key
    ``j // G``."""
    shift = neighbor_window - neighbor_window // group_size
    return (
        Segment(IDENTITY, IDENTITY, PairSelect(hi=neighbor_window)),
        Segment(PositionMap(div=group_size, add=shift), PositionMap(div=group_size), PairSelect(lo=neighbor_window)),
    )


def rerope_segments(window: int) -> tuple[Segment, ...]:
    """Near pairs (``i - j < w``) at true positions; far pairs with the query at ``w`` and the key at 0."""
    return (
        Segment(IDENTITY, IDENTITY, PairSelect(hi=window)),
        Segment(PositionMap.constant(window), PositionMap.constant(0), PairSelect(lo=window)),
    )


def sink_segments(start_size: int, recent_size: int) -> tuple[Segment, ...]:
    """Recent pairs (``i - j < R``) at true positions; sink keys (``j < S``) beyond the window with the query at
    cache position ``min(i, S + R - 1)``."""
    return (
        Segment(IDENTITY, IDENTITY, PairSelect(hi=recent_size)),
        Segment(PositionMap(cap=start_size + recent_size - 1), IDENTITY, PairSelect(lo=recent_size,
                                                                                    key_below=start_size)),
    )
