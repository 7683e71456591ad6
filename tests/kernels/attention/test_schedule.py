"""The tile lists: every tile holding a visible pair is listed (the kernels would silently drop it otherwise), and
empty tiles are skipped, so a sliding window costs O(T * W)."""

import pytest
import torch

from lce.kernels.attention.reference import visible_pairs
from lce.kernels.attention.schedule import build_schedule
from lce.kernels.attention.spec import AttentionSpec
from tests.kernels.attention.cases import CASES, positions, spec_for


def visible_tiles(spec, q_pos, k_pos, block_m, block_n):
    """bool ``[B, nQT, nKT]``: tiles holding a visible pair, by brute force over all pairs."""
    ok = visible_pairs(spec, q_pos, k_pos)
    if spec.segments:
        i, j = q_pos[:, :, None], k_pos[:, None, :]
        ok = ok & torch.stack([s.select(i, j) for s in spec.segments]).any(0)
    batch, tq, tk = ok.shape
    padded = torch.nn.functional.pad(ok, (0, -tk % block_n, 0, -tq % block_m))
    return padded.view(batch, padded.shape[1] // block_m, block_m, -1, block_n).any(4).any(2)


@pytest.mark.parametrize("layout", ["contiguous", "left_pad", "gaps"])
@pytest.mark.parametrize("case", CASES)
def test_every_tile_with_a_visible_pair_is_listed(case, layout):
    q_pos, k_pos = positions(2, 50, 83, layout)
    spec = spec_for(case, length=300)
    for block_m, block_n in [(8, 16), (16, 8)]:
        schedule = build_schedule(spec, q_pos, k_pos, block_m, block_n)
        needed = visible_tiles(spec, q_pos, k_pos, block_m, block_n)
        listed = torch.zeros_like(needed)
        for b in range(needed.shape[0]):
            for qt in range(needed.shape[1]):
                listed[b, qt, schedule.kv_index[b, qt, : schedule.kv_count[b, qt]].long()] = True
                for kt in range(needed.shape[2]):
                    in_transpose = qt in schedule.q_index[b, kt, : schedule.q_count[b, kt]].tolist()
                    assert in_transpose == bool(listed[b, qt, kt])
        assert not (needed & ~listed).any(), f"unlisted tiles with visible pairs ({block_m}x{block_n})"


def test_lists_are_ascending():
    q_pos, k_pos = positions(2, 50, 83, "gaps")
    schedule = build_schedule(spec_for("block_sparse", length=300), q_pos, k_pos, 8, 8)
    for b in range(2):
        for qt in range(schedule.kv_count.shape[1]):
            tiles = schedule.kv_index[b, qt, : schedule.kv_count[b, qt]]
            assert (tiles[1:] > tiles[:-1]).all()


def test_sliding_window_visits_a_constant_number_of_tiles():
    """4096 tokens, window 128, 64-token tiles: each query tile visits at most 4 key tiles (window + its own tile),
    plus the sinks' tile: O(T * W) work instead of the 2080 tiles of full causal attention."""
    length, block = 4096, 64
    q_pos, k_pos = positions(1, length, length)
    window = build_schedule(AttentionSpec(1.0, window=128, sink_tokens=4), q_pos, k_pos, block, block)
    causal = build_schedule(AttentionSpec(1.0), q_pos, k_pos, block, block)
    assert int(window.kv_count.max()) <= 128 // block + 1 + 1
    assert int(causal.kv_count.sum()) == 64 * 65 // 2
    assert int(window.kv_count.sum()) <= 4 * length // block
