"""The staircase path of segmented_attention (inference on CPU, no [Tq, Tk] tensor) equals the eager reference: the
same segments with their logits merged before one explicit softmax (grad mode on, one block)."""

import pytest
import torch

from lce.core import staircase as segs
from lce.core.segments import segmented_attention
from lce.core.staircase import selected_spans, staircase_applies, staircase_pieces
from lce.kernels.attention.spec import PairSelect
from lce.kernels.rope import Rotation
from lce.posenc.dca import DcaGeometry
from lce.posenc.rerope import rerope_segments
from lce.posenc.self_extend import self_extend_segments
from lce.posenc.sinks import sink_segments

ROTATION = Rotation(1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))

# Windows narrower and wider than the staircase's blocks, DCA strides that the block size divides and that it does
# not, all of them acting within the test lengths.
METHODS = {
    "dca_code": DcaGeometry(96, 72, 12).segments(),
    "dca_paper": DcaGeometry(96, 64, 16, "paper").segments(),
    "dca_odd_stride": DcaGeometry(50, 37, 4).segments(),
    "self_extend": self_extend_segments(4, 80),
    "self_extend_narrow": self_extend_segments(3, 20),
    "rerope": rerope_segments(70),
    "sinks": sink_segments(4, 90),
}


def qkv(length, batch=1, heads=4, kv_heads=2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(batch, heads, length, 16, generator=gen, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, length, 16, generator=gen, dtype=dtype) for _ in range(2))
    return q, k, v


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(segs, "STAIRCASE_ROWS", 64)  # several blocks and ragged pieces at test lengths
    segs._plan.cache_clear()  # plans made with other block sizes or before a monkeypatch


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("length,offset", [(300, 0), (37, 0), (120, 200)])
def test_staircase_equals_the_reference(name, length, offset):
    """Full forwards (offset 0) and a chunk of queries after cached keys (offset 200: keys 0..319, queries from
    200), as a prefill continued from a cache computes it."""
    data = METHODS[name]
    q, k, v = qkv(offset + length)
    q = q[:, :, offset:]
    q_pos, k_pos = torch.arange(offset, offset + length)[None], torch.arange(offset + length)[None]
    assert staircase_applies(data, q, q_pos, k_pos, None, None, None) is False  # grad mode is on in tests
    with torch.no_grad():
        assert staircase_applies(data, q, q_pos, k_pos, None, None, None)
        out = segmented_attention(q, k, v, list(data), ROTATION, q_pos, k_pos, 0.25)
    with torch.enable_grad():
        ref = segmented_attention(q, k, v, data, ROTATION, q_pos, k_pos, 0.25, block_size=10_000)
    # fp32, the same products; per-piece softmaxes reweighted by their log-sum-exp: a few ulps of the outputs.
    torch.testing.assert_close(out, ref.detach(), atol=3e-6, rtol=3e-6)


def test_staircase_in_bfloat16_stays_within_bfloat16_error():
    data = METHODS["self_extend"]
    q, k, v = qkv(300)
    pos = torch.arange(300)[None]
    with torch.no_grad():
        exact = segmented_attention(q.double(), k.double(), v.double(), data, ROTATION, pos, pos, 0.25,
                                    block_size=10_000)
        ours = segmented_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), list(data), ROTATION, pos, pos, 0.25)
    with torch.enable_grad():
        theirs = segmented_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), data, ROTATION, pos, pos, 0.25,
                                     block_size=10_000)
    own_error = (theirs.detach().double() - exact).abs().max()
    # The flash-attention rule: at most twice the error of the same computation in bf16 by the reference, + a floor.
    assert (ours.double() - exact).abs().max() <= 2 * own_error + 1e-3


def test_padding_and_restrictions_take_the_masked_path():
    data = METHODS["dca_code"]
    q, _, _ = qkv(40, batch=2)
    pos = torch.arange(40)[None].repeat(2, 1)
    with torch.no_grad():
        assert staircase_applies(data, q, pos, pos, None, None, None)
        assert not staircase_applies(data, q, pos - torch.tensor([[0], [3]]), pos, None, None, None)  # padded row
        assert not staircase_applies(data, q, pos, pos, torch.ones(2, 1, 40, 40, dtype=torch.bool), None, None)
        assert not staircase_applies(data, q, pos, pos, None, None, 30.0)


def test_spans_and_pieces_of_a_band_are_a_causal_tile_a_full_run_and_a_flipped_triangle():
    """A query block [256, 320) under a window of 100 keys: its own keys are a causal tile, the keys every row sees
    form one full piece, and the band's back edge (row r: keys [157 + r, 220)) is an upper triangle that runs
    causal on reversed rows and columns; the remapped segment beyond the band ends in a causal tile. No bias."""
    i = torch.arange(256, 320)
    start, stop = selected_spans(PairSelect(hi=100), i, 0, 1000)
    assert torch.equal(start, i - 99) and torch.equal(stop, i + 1)
    pieces = staircase_pieces(start, stop, torch.float32)
    fields = [(p.start, p.stop, p.first, p.last, p.causal, p.flipped, p.bias) for p in pieces]
    assert fields == [(256, 320, 0, None, True, False, None), (220, 256, 0, None, False, False, None),
                      (157, 220, 0, 63, False, True, None)]
    far = staircase_pieces(*selected_spans(PairSelect(lo=100), i, 0, 1000), torch.float32)
    assert [(p.start, p.stop, p.first, p.last, p.causal, p.bias) for p in far] == [
        (156, 220, 0, None, True, None), (0, 156, 0, None, False, None)]


def test_a_band_edge_in_the_middle_of_a_block_is_a_causal_triangle_on_its_live_rows():
    """Rows whose selection ends one key further per row, starting empty: rows 1.. form a causal square."""
    start = torch.zeros(8, dtype=torch.long)
    stop = torch.arange(8) + 10  # row r: keys [0, 10 + r); full run [0, 10), edge [10, 17)
    pieces = staircase_pieces(start, stop, torch.float32)
    assert [(p.start, p.stop, p.first, p.last, p.causal, p.bias) for p in pieces] == [
        (9, 17, 0, None, True, None), (0, 9, 0, None, False, None)]
    clamped = staircase_pieces(torch.zeros(8, dtype=torch.long), (torch.arange(8) + 10).clamp(max=14), torch.float32)
    assert [p.bias is not None for p in clamped] == [False, True]  # a clamped edge is no triangle: biased, exact


@pytest.mark.parametrize("name,segments,length", [
    ("self_extend", self_extend_segments(3, 1024), 16384),
    ("rerope", rerope_segments(512), 16384),
    ("sinks", sink_segments(4, 8188), 16384),
    ("dca", DcaGeometry(8192, 6144, 1024).segments(), 16384),
])
def test_the_real_model_settings_run_without_any_mask(name, segments, length, monkeypatch):
    """At the real-model experiment's settings every piece runs maskless (full, causal or flipped causal): no bias,
    so nothing of ``rows x rows`` floats is built and the fused kernel never takes its masked path (several times
    slower on CPU), except the few rows of sinks where the window passes the sink tokens. Self-Extend's grouped
    and ReRoPE's far pairs are one causal square for the whole call."""
    monkeypatch.setattr(segs, "STAIRCASE_ROWS", 1024)
    plan = segs.staircase_plan(tuple(segments), 0, 0, length, length, torch.bfloat16)
    assert plan.whole is None
    window = {"self_extend": 1024, "rerope": 512}
    assert plan.far == ({1: window[name]} if name in window else {})
    biased = [piece for _, _, chosen in plan.blocks for _, pieces in chosen for piece in pieces
              if piece.bias is not None]
    assert all(piece.bias.shape[0] <= 1024 for piece in biased)
    assert len(biased) == (1 if name == "sinks" else 0)


def test_block_rows_follow_chunk_strides_and_band_widths(monkeypatch):
    monkeypatch.setattr(segs, "STAIRCASE_ROWS", 1024)
    assert segs.staircase_rows(DcaGeometry(8192, 6144, 1024).segments()) == 1024  # 5120 = 5 x 1024
    assert segs.staircase_rows(DcaGeometry(96, 72, 12).segments()) == 60
    assert segs.staircase_rows(self_extend_segments(3, 1024)[:1]) == 1024  # the neighbour band: tile + back edge
    assert segs.staircase_rows(rerope_segments(512)[:1]) == 512
    assert segs.staircase_rows(rerope_segments(40)[:1]) == 64  # narrower bands: ragged pieces with a bias
    assert segs.staircase_rows(sink_segments(4, 8188)) == 1024


def test_a_far_segment_is_one_square_only_where_it_starts_inside_the_call():
    """Pairs at distance >= W from query row W - (q0 - k0) on: a full forward or a prefill continuing a short cache
    takes the square; a chunk of queries after more than W cached keys, or bounded rules, do not."""
    far = rerope_segments(70)[1].select
    assert segs._far_square_start(far, 0, 300) == 70
    assert segs._far_square_start(far, 50, 100) == 20
    assert segs._far_square_start(far, 200, 120) is None  # its first query already sees 131 far keys
    assert segs._far_square_start(far, 0, 70) is None  # no query is that far yet
    assert segs._far_square_start(sink_segments(4, 90)[1].select, 0, 300) is None  # sink keys only
    assert segs._far_square_start(DcaGeometry(96, 72, 12).segments()[2].select, 0, 300) is None  # chunks


@pytest.mark.parametrize("name,length", [("dca_code", 60), ("self_extend", 80), ("rerope", 70), ("sinks", 90)])
def test_windows_covering_the_sequence_cost_one_plain_causal_call(name, length, monkeypatch):
    """Up to the length where a method starts to act, it is plain causal attention: one fused call per layer (no
    blocks, no merging), equal to the reference. One query more and the staircase runs."""
    data = METHODS[name]
    calls = []
    monkeypatch.setattr(segs, "staircase_pieces", lambda *a: calls.append(a) or [])
    for tq, blocked in ((length, False), (length + 1, True)):
        q, k, v = qkv(tq)
        pos = torch.arange(tq)[None]
        calls.clear()
        with torch.no_grad():
            out = segmented_attention(q, k, v, list(data), ROTATION, pos, pos, 0.25)
        assert bool(calls) is blocked
        if not blocked:
            with torch.enable_grad():
                ref = segmented_attention(q, k, v, data, ROTATION, pos, pos, 0.25, block_size=10_000)
            torch.testing.assert_close(out, ref.detach(), atol=3e-6, rtol=3e-6)
