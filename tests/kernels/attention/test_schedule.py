"""The tile lists: every tile holding a visible pair a segment owns is in that segment's list (the kernels would
silently drop it otherwise), every tile listed as full has every pair visible and owned (the kernels build no mask
there), empty tiles are skipped (a sliding window costs O(T * W)), and one forward's layers share one schedule."""

import pytest
import torch

from lce.kernels.attention.reference import visible_pairs
from lce.kernels.attention.schedule import _SCHEDULES, SCHEDULES_KEPT, build_schedule, cached_schedule
from lce.kernels.attention.spec import AttentionSpec
from tests.kernels.attention.cases import CASES, positions, spec_for


def owned_pairs(spec, q_pos, k_pos):
    """bool ``[S, B, Tq, Tk]``: visible pairs owned by each segment (one segment owning all without segments), by
    brute force over all pairs; the last segment selecting a pair owns it."""
    ok = visible_pairs(spec, q_pos, k_pos)
    if not spec.segments:
        return ok[None]
    i, j = q_pos[:, :, None], k_pos[:, None, :]
    selects = [s.select(i, j) for s in spec.segments]
    owned, taken = [], torch.zeros_like(ok)
    for sel in reversed(selects):
        owned.append(ok & sel & ~taken)
        taken = taken | sel
    return torch.stack(owned[::-1])


def per_tile(pairs, block_m, block_n, reduce, pad_value):
    """``[S, B, Tq, Tk]`` -> ``[S, B, nQT, nKT]`` by ``reduce`` (any/all) over each tile (padding as ``pad_value``)."""
    s, batch, tq, tk = pairs.shape
    padded = torch.nn.functional.pad(pairs, (0, -tk % block_n, 0, -tq % block_m), value=pad_value)
    tiles = padded.view(s, batch, padded.shape[2] // block_m, block_m, -1, block_n)
    return getattr(getattr(tiles, reduce)(5), reduce)(3)


def listed(count, index, n):
    """bool ``[S, B, nQT, n]`` from the lists, and the position of each entry in its list."""
    out = torch.zeros(*count.shape, n, dtype=torch.bool)
    for key in torch.cartesian_prod(*(torch.arange(d) for d in count.shape)).tolist():
        key = tuple(key)
        entries = index[key][: count[key]].long()
        assert len(set(entries.tolist())) == len(entries), "a tile listed twice"
        out[key][entries] = True
    return out


@pytest.mark.parametrize("layout", ["contiguous", "left_pad", "gaps"])
@pytest.mark.parametrize("case", CASES)
def test_every_tile_with_an_owned_pair_is_listed_and_full_tiles_need_no_mask(case, layout):
    q_pos, k_pos = positions(2, 50, 83, layout)
    spec = spec_for(case, length=300)
    pairs = owned_pairs(spec, q_pos, k_pos)
    for block_m, block_n in [(8, 16), (16, 8)]:
        schedule = build_schedule(spec, q_pos, k_pos, block_m, block_n)
        needed = per_tile(pairs, block_m, block_n, "any", False)
        every = per_tile(pairs, block_m, block_n, "all", False)  # padding counts as "not visible"
        n_qt, n_kt = needed.shape[2:]
        kv = listed(schedule.kv_count, schedule.kv_index, n_kt)
        assert not (needed & ~kv).any(), f"unlisted tiles with owned pairs ({block_m}x{block_n})"
        transposed = listed(schedule.q_count, schedule.q_index, n_qt)
        assert torch.equal(transposed, kv.transpose(-1, -2)), "the transposed lists differ"
        for lists, full_count, need_all in ((schedule.kv_index, schedule.kv_full, every),
                                            (schedule.q_index, schedule.q_full, every.transpose(-1, -2))):
            for key in torch.cartesian_prod(*(torch.arange(d) for d in full_count.shape)).tolist():
                key = tuple(key)
                full_tiles = lists[key][: full_count[key]].long()
                assert need_all[key][full_tiles].all(), f"a tile listed as full needs a mask: {key}"
                assert (full_tiles[1:] > full_tiles[:-1]).all()
        # The plain causal case with aligned tiles has full tiles (below the diagonal): the unmasked loop runs.
        if case == "causal" and layout == "contiguous":
            assert int(schedule.kv_full.sum()) > 0


def test_partial_tiles_follow_the_full_ones_in_ascending_order():
    q_pos, k_pos = positions(2, 50, 83, "gaps")
    schedule = build_schedule(spec_for("block_sparse", length=300), q_pos, k_pos, 8, 8)
    for b in range(2):
        for qt in range(schedule.kv_count.shape[2]):
            tiles = schedule.kv_index[0, b, qt, schedule.kv_full[0, b, qt]: schedule.kv_count[0, b, qt]]
            assert (tiles[1:] > tiles[:-1]).all()


def test_sliding_window_visits_a_constant_number_of_tiles():
    """4096 tokens, window 128, 64-token tiles: each query tile visits at most 4 key tiles (window + its own tile),
    plus the sinks' tile: O(T * W) work instead of the 2080 tiles of full causal attention; full causal attention's
    tiles below the diagonal (2016) need no mask."""
    length, block = 4096, 64
    q_pos, k_pos = positions(1, length, length)
    window = build_schedule(AttentionSpec(1.0, window=128, sink_tokens=4), q_pos, k_pos, block, block)
    causal = build_schedule(AttentionSpec(1.0), q_pos, k_pos, block, block)
    assert int(window.kv_count.max()) <= 128 // block + 1 + 1
    assert int(causal.kv_count.sum()) == 64 * 65 // 2
    assert int(causal.kv_full.sum()) == 64 * 63 // 2
    assert int(window.kv_count.sum()) <= 4 * length // block
    assert causal.kv_index.dtype == torch.int16


def test_layers_of_one_forward_share_the_schedule():
    q_pos, k_pos = positions(1, 40, 40)
    spec = AttentionSpec(0.5, window=16)
    first = cached_schedule(spec, q_pos, k_pos, 8, 8)
    assert cached_schedule(AttentionSpec(0.25, window=16), q_pos, k_pos, 8, 8) is first  # scale: irrelevant
    assert cached_schedule(AttentionSpec(0.5, window=8), q_pos, k_pos, 8, 8) is not first
    assert cached_schedule(spec, q_pos[:, 0:], k_pos[:, 0:], 8, 8) is first  # a layer's own view of the same ids
    assert cached_schedule(spec, q_pos.clone(), k_pos, 8, 8) is not first  # other memory: built again
    q_pos += 1  # changed in place: its version moves on
    assert cached_schedule(spec, q_pos, k_pos, 8, 8) is not first
    assert cached_schedule(spec, q_pos[:, 1:], k_pos[:, 1:], 8, 8).kv_count.shape[-1] == 5  # other layout
    assert len(_SCHEDULES) <= SCHEDULES_KEPT


def test_positions_made_in_inference_mode_are_cached_too():
    """lce's evaluation runs under torch.inference_mode, whose tensors have no version counter."""
    with torch.inference_mode():
        q_pos, k_pos = positions(1, 24, 24)
        spec = AttentionSpec(0.5)
        assert cached_schedule(spec, q_pos, k_pos, 8, 8) is cached_schedule(spec, q_pos[:, 0:], k_pos, 8, 8)
