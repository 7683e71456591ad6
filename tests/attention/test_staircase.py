"""The staircase path of segmented_attention (inference on CPU, no [Tq, Tk] tensor) equals the paper-following
reference: the callable segments of each method with their logits merged before one softmax (grad mode on)."""

import pytest
import torch

from lce.attention import segments as segs
from lce.attention.segments import segmented_attention, selected_spans, staircase_applies, staircase_pieces
from lce.kernels.attention import segments as data_segments
from lce.kernels.attention.spec import PairSelect
from lce.posenc.dca import DcaGeometry
from lce.posenc.rerope import rerope_segments
from lce.posenc.rotation import Rotation
from lce.posenc.self_extend import self_extend_segments
from lce.posenc.sinks import sink_segments

ROTATION = Rotation(1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))

# (data form, callable reference): windows narrower and wider than the staircase's blocks, DCA strides that the
# block size divides and that it does not, all of them acting within the test lengths.
METHODS = {
    "dca_code": (data_segments.dca_segments(DcaGeometry(96, 72, 12)), DcaGeometry(96, 72, 12).segments()),
    "dca_paper": (data_segments.dca_segments(DcaGeometry(96, 64, 16, "paper")),
                  DcaGeometry(96, 64, 16, "paper").segments()),
    "dca_odd_stride": (data_segments.dca_segments(DcaGeometry(50, 37, 4)), DcaGeometry(50, 37, 4).segments()),
    "self_extend": (data_segments.self_extend_segments(4, 80), self_extend_segments(4, 80)),
    "self_extend_narrow": (data_segments.self_extend_segments(3, 20), self_extend_segments(3, 20)),
    "rerope": (data_segments.rerope_segments(70), rerope_segments(70)),
    "sinks": (data_segments.sink_segments(4, 90), sink_segments(4, 90)),
}


def qkv(length, batch=1, heads=4, kv_heads=2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(batch, heads, length, 16, generator=gen, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, length, 16, generator=gen, dtype=dtype) for _ in range(2))
    return q, k, v


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(segs, "STAIRCASE_ROWS", 64)  # several blocks and ragged pieces at test lengths


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("length,offset", [(300, 0), (37, 0), (120, 200)])
def test_staircase_equals_the_reference(name, length, offset):
    """Full forwards (offset 0) and a chunk of queries after cached keys (offset 200: keys 0..319, queries from
    200), as a prefill continued from a cache computes it."""
    data, reference = METHODS[name]
    q, k, v = qkv(offset + length)
    q = q[:, :, offset:]
    q_pos, k_pos = torch.arange(offset, offset + length)[None], torch.arange(offset + length)[None]
    assert staircase_applies(data, q, q_pos, k_pos, None, None, None) is False  # grad mode is on in tests
    with torch.no_grad():
        assert staircase_applies(data, q, q_pos, k_pos, None, None, None)
        out = segmented_attention(q, k, v, list(data), ROTATION, q_pos, k_pos, 0.25)
    with torch.enable_grad():
        ref = segmented_attention(q, k, v, reference, ROTATION, q_pos, k_pos, 0.25, block_size=10_000)
    # fp32, the same products; per-piece softmaxes reweighted by their log-sum-exp: a few ulps of the outputs.
    torch.testing.assert_close(out, ref.detach(), atol=3e-6, rtol=3e-6)


def test_staircase_in_bfloat16_stays_within_bfloat16_error():
    data, reference = METHODS["self_extend"]
    q, k, v = qkv(300)
    pos = torch.arange(300)[None]
    with torch.no_grad():
        exact = segmented_attention(q.double(), k.double(), v.double(), reference, ROTATION, pos, pos, 0.25,
                                    block_size=10_000)
        ours = segmented_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), list(data), ROTATION, pos, pos, 0.25)
    with torch.enable_grad():
        theirs = segmented_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), reference, ROTATION, pos, pos, 0.25,
                                     block_size=10_000)
    own_error = (theirs.detach().double() - exact).abs().max()
    # The flash-attention rule: at most twice the error of the same computation in bf16 by the reference, + a floor.
    assert (ours.double() - exact).abs().max() <= 2 * own_error + 1e-3


def test_padding_and_restrictions_take_the_masked_path():
    data, _ = METHODS["dca_code"]
    q, _, _ = qkv(40, batch=2)
    pos = torch.arange(40)[None].repeat(2, 1)
    with torch.no_grad():
        assert staircase_applies(data, q, pos, pos, None, None, None)
        assert not staircase_applies(data, q, pos - torch.tensor([[0], [3]]), pos, None, None, None)  # padded row
        assert not staircase_applies(data, q, pos, pos, torch.ones(2, 1, 40, 40, dtype=torch.bool), None, None)
        assert not staircase_applies(data, q, pos, pos, None, None, 30.0)
        assert not staircase_applies(METHODS["dca_code"][1], q, pos, pos, None, None, None)  # callable selects


def test_spans_and_pieces_of_a_band_are_one_causal_tile_one_full_run_and_one_ragged_edge():
    """A query block [256, 320) under a window of 100 keys: its own keys are a causal tile, the keys every row sees
    form one full piece, and the band's ragged edge is the only biased piece."""
    i = torch.arange(256, 320)
    start, stop = selected_spans(PairSelect(hi=100), i, 0, 1000)
    assert torch.equal(start, i - 99) and torch.equal(stop, i + 1)
    pieces = staircase_pieces(start, stop, torch.float32)
    assert [(p.start, p.stop, p.causal, p.bias is not None) for p in pieces] == [
        (256, 320, True, False), (220, 256, False, False), (157, 220, False, True)]
    far = staircase_pieces(*selected_spans(PairSelect(lo=100), i, 0, 1000), torch.float32)
    assert [(p.start, p.stop, p.causal, p.bias is not None) for p in far] == [(156, 220, True, False),
                                                                               (0, 156, False, False)]


def test_pieces_never_build_a_tokens_by_tokens_tensor(monkeypatch):
    """At 4096 tokens no tensor the staircase builds has more than rows x rows elements per piece (1024^2)."""
    monkeypatch.setattr(segs, "STAIRCASE_ROWS", 1024)
    data = data_segments.self_extend_segments(3, 1024)
    largest = 0
    for first in range(0, 4096, 1024):
        i = torch.arange(first, first + 1024)
        for seg in data:
            for piece in staircase_pieces(*selected_spans(seg.select, i, 0, 4096), torch.float32):
                if piece.bias is not None:
                    largest = max(largest, piece.bias.numel())
    assert 0 < largest <= 1024 * 1024


def test_block_rows_follow_chunk_strides_and_band_widths(monkeypatch):
    monkeypatch.setattr(segs, "STAIRCASE_ROWS", 1024)
    assert segs.staircase_rows(data_segments.dca_segments(DcaGeometry(8192, 6144, 1024))) == 1024  # 5120 = 5 x 1024
    assert segs.staircase_rows(data_segments.dca_segments(DcaGeometry(96, 72, 12))) == 60
    assert segs.staircase_rows(data_segments.self_extend_segments(3, 1024)) == 1024
    assert segs.staircase_rows(data_segments.rerope_segments(512)) == 512
    assert segs.staircase_rows(data_segments.sink_segments(4, 8188)) == 1024


@pytest.mark.parametrize("name,length", [("dca_code", 60), ("self_extend", 80), ("rerope", 70), ("sinks", 90)])
def test_windows_covering_the_sequence_cost_one_plain_causal_call(name, length, monkeypatch):
    """Up to the length where a method starts to act, it is plain causal attention: one fused call per layer (no
    blocks, no merging), equal to the reference. One query more and the staircase runs."""
    data, reference = METHODS[name]
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
                ref = segmented_attention(q, k, v, reference, ROTATION, pos, pos, 0.25, block_size=10_000)
            torch.testing.assert_close(out, ref.detach(), atol=3e-6, rtol=3e-6)
