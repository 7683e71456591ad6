"""lce's attention dispatcher: an empty plan is the model's SDPA attention; rotation inside attention at the true
positions is plain RoPE (prefill and decode); masks still reach the function; plans are per instance."""

import torch

import lce
from lce.core.plan import AttentionPlan, key_positions
from lce.core.segments import SegmentLayer, segmented_attention
from lce.hf.adapters import adapter_for
from lce.hf.patch import PatchTarget
from lce.kernels.attention.spec import IDENTITY, PairSelect, Segment
from tests.conftest import assert_close_to_reference, assert_decode_matches_full, fp64_logits, logits, make_tiny_llama

ROPE = (Segment(IDENTITY, IDENTITY, PairSelect()),)  # every pair at its true positions


def rope_in_attention(model):
    """Plain RoPE re-implemented inside attention through one identity segment."""
    target = PatchTarget(model, adapter_for(model))
    rotation = target.rotate_in_attention("test")

    layer = SegmentLayer("test_rope", ROPE, rotation, block_size=5)
    target.compute_attention("test_rope", lambda index, module: layer)
    target.finalize()


IDS = torch.randint(3, 259, (2, 23), generator=torch.Generator().manual_seed(0))


def test_plan_without_kernel_is_the_models_sdpa_attention():
    model, reference = make_tiny_llama(), make_tiny_llama()
    target = PatchTarget(model, adapter_for(model))
    target.scale_queries("test_unit", 10**6)  # log-n with a training length no test reaches: every multiplier is 1
    target.finalize()
    assert model.config._attn_implementation == "lce_test_unit"
    assert isinstance(model.model.layers[0].self_attn.lce_plan, AttentionPlan)
    assert torch.equal(logits(model, IDS), logits(reference, IDS))
    assert reference.config._attn_implementation == "sdpa"  # the other instance is untouched


def test_rope_inside_attention_equals_stock_rope():
    model, reference = make_tiny_llama(), make_tiny_llama()
    rope_in_attention(model)
    # Block-wise eager softmax vs SDPA: same math, different summation order in fp32.
    assert_close_to_reference(logits(model, IDS), logits(reference, IDS), fp64_logits(reference, IDS))


def test_rope_inside_attention_decodes_like_a_full_forward():
    model = make_tiny_llama()
    rope_in_attention(model)
    assert_decode_matches_full(model, IDS, prefill=15)


def test_padding_mask_reaches_the_kernel():
    model = make_tiny_llama()
    rope_in_attention(model)
    ids = IDS[:1, :10]
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    torch.testing.assert_close(
        logits(model, padded, attention_mask=mask, position_ids=position_ids)[:, 4:], logits(model, ids),
        atol=2e-5, rtol=2e-5,  # fp32 reduction order
    )


def test_segmented_attention_gradients_match_sdpa():
    rotation = adapter_for(make_tiny_llama()).rotation(make_tiny_llama().model.rotary_emb)
    q = torch.randn(1, 4, 13, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 13, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 13, 16, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(13)[None]
    out = segmented_attention(q, k, v, ROPE, rotation, pos, pos, 0.25,
                              block_size=4)
    qr, kr = rotation.apply(q, pos), rotation.apply(k, pos)
    ref = torch.nn.functional.scaled_dot_product_attention(qr, kr, v, is_causal=True, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_segmented_attention_training_keeps_one_block_of_scores():
    """Blocks are recomputed in the backward pass: autograd saves O(T * block), not the [B, H, T, T] scores."""
    rotation = adapter_for(make_tiny_llama()).rotation(make_tiny_llama().model.rotary_emb)
    heads, t, block = 4, 1024, 64
    q = torch.randn(1, heads, t, 16, requires_grad=True)
    k, v = torch.randn(1, 2, t, 16), torch.randn(1, 2, t, 16)
    pos = torch.arange(t)[None]
    saved = {}  # storage -> bytes: every block saves the same rotated keys and values, which exist once

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = segmented_attention(q, k, v, ROPE, rotation, pos, pos, 0.25,
                                  block_size=block)
    full_scores = heads * t * t * 4
    total = sum(saved.values())
    assert total < full_scores / 8, f"autograd saved {total} bytes; the scores alone are {full_scores}"
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_a_calls_own_keys_sit_at_the_queries_positions():
    jumping = torch.tensor([[0, 1, 2, 40, 41]])  # PoSE's skipped positions; packed documents restart likewise
    assert torch.equal(key_positions(jumping, 5), jumping)
    assert torch.equal(key_positions(torch.tensor([[7, 8]]), 5), torch.tensor([[4, 5, 6, 7, 8]]))  # cache + new


def test_kernels_see_skipped_positions_like_transformers_does():
    """Self-Extend whose neighbour window covers every distance is plain RoPE: with jumping position ids too."""
    model, reference = make_tiny_llama(), make_tiny_llama()
    lce.patch(model, "self_extend", group_size=2, neighbor_window=63)
    positions = torch.cat([torch.arange(10), torch.arange(40, 53)])[None].expand(2, -1)
    # Block-wise eager softmax over segments vs SDPA: same math, different summation order in fp32.
    expected = logits(reference, IDS, position_ids=positions)
    assert_close_to_reference(logits(model, IDS, position_ids=positions), expected,
                              fp64_logits(reference, IDS, position_ids=positions))


def test_moved_names_still_resolve_with_a_warning():
    import warnings

    import lce.attention.blockwise
    import lce.attention.plan
    import lce.attention.segments
    from lce.core import blockwise, plan, segments, staircase
    from lce.hf import dispatch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lce.attention.plan.FusedAttention is plan.FusedAttention
        assert lce.attention.plan.Kernel is plan.LayerAttention
        assert lce.attention.plan.lce_attention_forward is dispatch.lce_attention_forward
        assert lce.attention.segments.segmented_attention is segments.segmented_attention
        assert lce.attention.segments.staircase_pieces is staircase.staircase_pieces
        assert lce.attention.blockwise.blockwise_attention is blockwise.blockwise_attention
    assert len(caught) == 6 and all(issubclass(w.category, DeprecationWarning) for w in caught)
    assert "lce.core.plan.FusedAttention" in str(caught[0].message)


def test_use_kernel_still_installs_a_plain_function():
    """The deprecated ``PatchTarget.use_kernel`` (a function per layer, its capabilities declared by the caller)
    computes what ``compute_attention`` with the same computation does."""
    import pytest

    model, expected = make_tiny_llama(), make_tiny_llama()
    rope_in_attention(expected)
    target = PatchTarget(model, adapter_for(model))
    rotation = target.rotate_in_attention("test")

    def function(module, query, key, value, mask, scaling, dropout, q_pos, k_pos, **kwargs):
        return segmented_attention(query, key, value, ROPE, rotation, q_pos, k_pos, scaling, mask, block_size=5), None

    with pytest.warns(DeprecationWarning, match="use compute_attention"):
        target.use_kernel("test_rope", lambda index, module: function)
    target.finalize()
    assert torch.equal(logits(model, IDS), logits(expected, IDS))
