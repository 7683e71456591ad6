"""The spec's segments (data) equal the callables lce's position encodings use, on a grid of positions that
includes negative (left-pad) keys and several chunks/windows."""

import pytest
import torch

from lce.attention.segments import Segment as CallableSegment
from lce.kernels.attention import segments as spec_segments
from lce.posenc.dca import DcaGeometry
from lce.posenc.rerope import rerope_segments
from lce.posenc.self_extend import self_extend_segments
from lce.posenc.sinks import sink_segments

POSITIONS = torch.arange(-13, 90)  # negative keys of left padding, and several DCA chunks / windows


def assert_same_segments(ours, theirs: list[CallableSegment]):
    assert len(ours) == len(theirs)
    p = POSITIONS[None]
    i, j = POSITIONS[None, :, None], POSITIONS[None, None, :]
    for index, (mine, ref) in enumerate(zip(ours, theirs)):
        assert torch.equal(mine.q_map(p), ref.q_map(p)), f"segment {index} q_map"
        assert torch.equal(mine.k_map(p), ref.k_map(p)), f"segment {index} k_map"
        assert torch.equal(mine.select(i, j), ref.select(i, j)), f"segment {index} select"
        assert mine.q_map(p).dtype == p.dtype


@pytest.mark.parametrize("s,w", [(12, 4), (12, 8), (9, 0), (6, 5)], ids=["w<s/2", "w>s/2", "w=0", "stride1"])
def test_dca_code_convention(s, w):
    geometry = DcaGeometry(16, s, w, "code")
    assert_same_segments(spec_segments.dca_segments(geometry), geometry.segments())


@pytest.mark.parametrize("c,s,w", [(16, 12, 4), (20, 8, 3), (10, 5, 0)])
def test_dca_paper_convention(c, s, w):
    geometry = DcaGeometry(c, s, w, "paper")
    assert_same_segments(spec_segments.dca_segments(geometry), geometry.segments())


@pytest.mark.parametrize("g,w", [(3, 4), (4, 8), (1, 5), (5, 3)])
def test_self_extend(g, w):
    assert_same_segments(spec_segments.self_extend_segments(g, w), self_extend_segments(g, w))


@pytest.mark.parametrize("w", [1, 7, 32])
def test_rerope(w):
    assert_same_segments(spec_segments.rerope_segments(w), rerope_segments(w))


@pytest.mark.parametrize("s,r", [(4, 10), (0, 6), (1, 1), (3, 40)])
def test_sinks(s, r):
    assert_same_segments(spec_segments.sink_segments(s, r), sink_segments(s, r))
