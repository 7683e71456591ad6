"""Each segment method's segments (data) follow its paper's equations, written here directly as tensor formulas, on
a grid of positions that includes negative (left-pad) keys and several chunks/windows."""

import pytest
import torch

from lce.posenc.dca import DcaGeometry
from lce.posenc.rerope import rerope_segments
from lce.posenc.self_extend import self_extend_segments
from lce.posenc.sinks import sink_segments

POSITIONS = torch.arange(-13, 90)  # negative keys of left padding, and several DCA chunks / windows


def floor(x, d):
    return torch.div(x, d, rounding_mode="floor")


def assert_rules(segments, rules):
    """``rules``: per segment ``(q_map(p), k_map(p), select(i, j))`` as formulas."""
    assert len(segments) == len(rules)
    p = POSITIONS[None]
    i, j = POSITIONS[None, :, None], POSITIONS[None, None, :]
    for index, (segment, (q_map, k_map, select)) in enumerate(zip(segments, rules)):
        assert torch.equal(segment.q_map(p), q_map(p)), f"segment {index} q_map"
        assert torch.equal(segment.k_map(p), k_map(p)), f"segment {index} k_map"
        assert torch.equal(segment.select(i, j), select(i, j)), f"segment {index} select"
        assert segment.q_map(p).dtype == p.dtype


@pytest.mark.parametrize("s,w", [(12, 4), (12, 8), (9, 0), (6, 5)], ids=["w<s/2", "w>s/2", "w=0", "stride1"])
def test_dca_code_convention(s, w):
    """ChunkLlama: stride L = s - w, keys at j mod L; queries at i mod L, min(i mod L + L, s), min(2L - 1, s)."""
    stride = s - w
    in_chunk = lambda p: torch.remainder(p, stride)
    gap = lambda i, j: floor(i, stride) - floor(j, stride)
    assert_rules(DcaGeometry(16, s, w, "code").segments(), [
        (in_chunk, in_chunk, lambda i, j: gap(i, j) == 0),
        (lambda p: torch.clamp(in_chunk(p) + stride, max=s), in_chunk, lambda i, j: gap(i, j) == 1),
        (lambda p: torch.full_like(p, min(2 * stride - 1, s)), in_chunk, lambda i, j: gap(i, j) >= 2),
    ])


@pytest.mark.parametrize("c,s,w", [(16, 12, 4), (20, 8, 3), (10, 5, 0)])
def test_dca_paper_convention(c, s, w):
    """The paper (§3): stride s, keys at j mod s; queries at i mod s, s + (i mod s) for the first w queries of a
    chunk and c - 1 after, and c - 1 for inter-chunk pairs."""
    in_chunk = lambda p: torch.remainder(p, s)
    gap = lambda i, j: floor(i, s) - floor(j, s)
    successive = lambda p: torch.where(in_chunk(p) < w, s + in_chunk(p), torch.full_like(p, c - 1))
    assert_rules(DcaGeometry(c, s, w, "paper").segments(), [
        (in_chunk, in_chunk, lambda i, j: gap(i, j) == 0),
        (successive, in_chunk, lambda i, j: gap(i, j) == 1),
        (lambda p: torch.full_like(p, c - 1), in_chunk, lambda i, j: gap(i, j) >= 2),
    ])


@pytest.mark.parametrize("g,w", [(3, 4), (4, 8), (1, 5), (5, 3)])
def test_self_extend(g, w):
    """Neighbour pairs (i - j < W) at true positions; grouped: query floor(i / G) + W - floor(W / G), key
    floor(j / G) (arXiv:2401.01325 §3)."""
    same = lambda p: p
    assert_rules(self_extend_segments(g, w), [
        (same, same, lambda i, j: i - j < w),
        (lambda p: floor(p, g) + w - w // g, lambda p: floor(p, g), lambda i, j: i - j >= w),
    ])


@pytest.mark.parametrize("w", [1, 7, 32])
def test_rerope(w):
    """Near pairs at true positions; far pairs read as distance w (query at w, key at 0)."""
    same = lambda p: p
    assert_rules(rerope_segments(w), [
        (same, same, lambda i, j: i - j < w),
        (lambda p: torch.full_like(p, w), torch.zeros_like, lambda i, j: i - j >= w),
    ])


@pytest.mark.parametrize("s,r", [(4, 10), (0, 6), (1, 1), (3, 40)])
def test_sinks(s, r):
    """Recent keys at true positions; sink keys beyond the window with the query at cache position
    min(i, S + R - 1) (arXiv:2309.17453 §3.2)."""
    same = lambda p: p
    assert_rules(sink_segments(s, r), [
        (same, same, lambda i, j: i - j < r),
        (lambda p: p.clamp(max=s + r - 1), same, lambda i, j: (j < s) & (i - j >= r)),
    ])
