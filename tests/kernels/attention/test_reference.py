"""The spec reference equals lce's existing eager attention references (forward and backward, fp64 so that any
difference is a bug, not rounding)."""

import pytest
import torch

from lce.attention.local_global import LocalGlobalPattern
from lce.attention.sliding_window import SlidingWindowPattern
from lce.core.blockwise import masked_attention_eager
from lce.core.segments import segmented_attention
from lce.kernels.attention.reference import attention_reference
from lce.kernels.attention.spec import AttentionSpec
from lce.posenc.alibi import alibi_attention_eager, alibi_slopes
from lce.posenc.logn import logn_scale
from tests.kernels.attention.cases import (
    ROPE,
    SEGMENT_CASES,
    block_sparse_mask,
    case_segments,
    positions,
    random_qkv,
    rotary,
    segment_methods,
)
from tests.kernels.attention.cases import spec_for as case_spec

SCALE = 0.25
# fp64 on both sides: the two implementations sum in different orders, so they agree to rounding (~1e-15).
TOL = {"atol": 1e-10, "rtol": 1e-10}


def qkv64(tq=29, tk=37, dim=16):
    return random_qkv(2, 4, 2, tq, tk, dim, dtype=torch.float64, requires_grad=True)


def assert_same_with_grads(ours, theirs, inputs):
    torch.testing.assert_close(ours, theirs, **TOL)
    grad_out = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, inputs, grad_out)
    theirs_grads = torch.autograd.grad(theirs, inputs, grad_out)
    for name, a, b in zip("qkv", ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"d{name}: {m}")


def test_every_segment_method_has_a_case():
    """A registered segment method without a shared case would go untested by the reference and kernel tests."""
    assert {config["name"] for config, _ in SEGMENT_CASES.values()} == set(segment_methods())


@pytest.mark.parametrize("layout", ["contiguous", "left_pad", "gaps"])
@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("method", list(SEGMENT_CASES))
def test_segments_match_segmented_attention(method, style, layout):
    """The kernels' reference (all scores at once, last selecting segment wins) and lce's segmented attention (query
    blocks, segment logits merged before one softmax) compute the same method from the same segments."""
    q, k, v = qkv64()
    q_pos, k_pos = positions(2, 29, 37, layout)
    rope = rotary(16, 12, style=style, attention_scaling=1.2)  # partial rotary: 4 dims pass through
    ours = attention_reference(q, k, v, AttentionSpec(SCALE, case_segments(method), rope), q_pos, k_pos)
    theirs = segmented_attention(q, k, v, case_segments(method), rope, q_pos, k_pos, SCALE, block_size=16)
    assert_same_with_grads(ours, theirs, (q, k, v))


@pytest.mark.parametrize("layout", ["contiguous", "left_pad"])
def test_alibi_matches_alibi_attention_eager(layout):
    q, k, v = qkv64()
    q_pos, k_pos = positions(2, 29, 37, layout)
    slopes = alibi_slopes(4, torch.float64)
    ours = attention_reference(q, k, v, AttentionSpec(SCALE, alibi_slopes=slopes), q_pos, k_pos)
    assert_same_with_grads(ours, alibi_attention_eager(q, k, v, slopes, q_pos, k_pos, SCALE), (q, k, v))


@pytest.mark.parametrize("spec,pattern", [
    (AttentionSpec(SCALE, window=5), SlidingWindowPattern(5)),
    (AttentionSpec(SCALE, window=6, sink_tokens=3), SlidingWindowPattern(6, 3)),
    # Longformer's globals as a prefix: global keys are sinks, global queries (i < 3) see every earlier key anyway.
    (AttentionSpec(SCALE, window=4, sink_tokens=3), LocalGlobalPattern(4, (0, 1, 2))),
], ids=["sliding_window", "sliding_window_sinks", "local_global_prefix"])
@pytest.mark.parametrize("layout", ["contiguous", "left_pad", "gaps"])
def test_window_matches_masked_attention_eager(spec, pattern, layout):
    q, k, v = qkv64()
    q_pos, k_pos = positions(2, 29, 37, layout)
    ours = attention_reference(q, k, v, spec, q_pos, k_pos)
    assert_same_with_grads(ours, masked_attention_eager(q, k, v, q_pos, k_pos, SCALE, visible=pattern), (q, k, v))


def test_block_mask_matches_block_sparse_pattern():
    from lce.attention.block_sparse import BlockSparsePattern

    q, k, v = qkv64()
    q_pos, k_pos = positions(2, 29, 37, "gaps")
    pattern = BlockSparsePattern(4, window_blocks=2, global_blocks=1, random_blocks=2, seed=3)
    mask = block_sparse_mask(int(q_pos.max()) + 1, 4, window_blocks=2, global_blocks=1, random_blocks=2, seed=3)
    ours = attention_reference(q, k, v, AttentionSpec(SCALE, block_mask=mask, block_size=4), q_pos, k_pos)
    assert_same_with_grads(ours, masked_attention_eager(q, k, v, q_pos, k_pos, SCALE, visible=pattern), (q, k, v))


def test_logn_scales_queries_like_lce_logn():
    q, k, v = qkv64()
    q_pos, k_pos = positions(2, 29, 37, "left_pad")
    ours = attention_reference(q, k, v, AttentionSpec(SCALE, logn_length=8), q_pos, k_pos)
    scaled = q * logn_scale(8)(q_pos)[:, None, :, None].to(q.dtype)
    assert_same_with_grads(ours, masked_attention_eager(scaled, k, v, q_pos, k_pos, SCALE), (q, k, v))


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_identity_segment_is_rope_at_true_positions(style):
    q, k, v = qkv64()
    q_pos, k_pos = positions(2, 29, 37, "gaps")
    rope = rotary(16, 8, style=style, attention_scaling=0.8)
    ours = attention_reference(q, k, v, AttentionSpec(SCALE, ROPE, rope), q_pos, k_pos)
    theirs = masked_attention_eager(rope.apply(q, q_pos), rope.apply(k, k_pos), v, q_pos, k_pos, SCALE)
    assert_same_with_grads(ours, theirs, (q, k, v))


def test_rows_without_visible_keys_are_zero_with_finite_gradients():
    q, k, v = qkv64(tq=8, tk=8)
    q_pos, k_pos = positions(2, 8, 8)
    k_pos = k_pos + 4  # the first 4 queries come before every key
    spec = case_spec("sinks", dim=16)
    out = attention_reference(q, k, v, spec, q_pos, k_pos)
    assert (out[:, :4] == 0).all() and (out[:, 4:] != 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[:, :, :4] == 0).all()
