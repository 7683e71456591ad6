"""Sparse attention composed with position encodings: YaRN + sliding window (lce's block-wise kernel on rotated q/k),
ALiBi + block-sparse (ALiBi's kernels honour ``visible``), DCA + sliding window (``segmented_attention`` honours it),
log-n + sliding window; each against the position encoding alone given the pattern as an explicit mask. Kernels that
take no ``visible`` are refused at patch time; saved patches reload."""

import pytest
import torch

import lce
from lce.attention.block_sparse import BlockSparsePattern
from lce.attention.s2_attn import ShiftedGroups
from lce.attention.sliding_window import SlidingWindow, SlidingWindowPattern
from lce.core.plan import RESTRICTION, LayerAttention, Restriction
from lce.core.segments import segmented_attention
from lce.errors import LceError, UnsupportedModelError
from lce.hf.adapters import adapter_for
from lce.hf.patch import PatchTarget
from lce.posenc.alibi import alibi_attention, alibi_attention_eager, alibi_slopes
from lce.posenc.dca import Dca, dca_mscale
from lce.train.loop import enable_activation_checkpointing
from tests.attention.test_blockwise import PATTERNS, block_sparse_definition, definition_mask, random_qkv
from tests.conftest import assert_decode_matches_full, logits, make_tiny_llama
from tests.hf.test_adapters import family_model

IDS = torch.randint(3, 259, (2, 29), generator=torch.Generator().manual_seed(5))
POS = torch.arange(29)[None].expand(2, -1)
WINDOW = {"name": "sliding_window", "window": 6, "sink_tokens": 1, "query_block": 8}
BLOCKS = {"name": "block_sparse", "block_size": 4, "query_block": 8, "window_blocks": 2, "global_blocks": 1,
          "random_blocks": 1, "seed": 3}


def window_mask(window=6, sinks=1):
    return definition_mask(lambda i, j: (i - j < window) | (j < sinks), POS, POS)


def block_mask(params=BLOCKS):
    pattern = BlockSparsePattern(params["block_size"], params["window_blocks"], params["global_blocks"],
                                 params["random_blocks"], params["seed"])
    return definition_mask(block_sparse_definition(pattern), POS, POS)


# YaRN: frequencies in the rotary module, so restricted layers run lce's block-wise kernel on rotated q/k.

def test_yarn_with_sliding_window_equals_yarn_given_the_window_as_a_mask():
    model = lce.patch(make_tiny_llama(), "yarn", factor=2.0, attention=WINDOW)
    reference = lce.patch(make_tiny_llama(), "yarn", factor=2.0)
    assert reference.config._attn_implementation == "sdpa"  # YaRN alone keeps transformers' attention
    torch.testing.assert_close(logits(model, IDS), logits(reference, IDS, attention_mask=window_mask()),
                               atol=2e-5, rtol=2e-5)  # fp32 summation order
    assert (logits(model, IDS) - logits(reference, IDS)).abs().max() > 1e-2
    wide = lce.patch(make_tiny_llama(), "yarn", factor=2.0, attention={**WINDOW, "window": 29})
    torch.testing.assert_close(logits(wide, IDS), logits(reference, IDS), atol=2e-5, rtol=2e-5)
    assert_decode_matches_full(model, IDS, prefill=11)


def test_logn_with_sliding_window_scales_queries_then_restricts():
    model = lce.patch(make_tiny_llama(), "rope", logn=True, logn_length=8, attention=WINDOW)
    reference = lce.patch(make_tiny_llama(), "rope", logn=True, logn_length=8)
    torch.testing.assert_close(logits(model, IDS), logits(reference, IDS, attention_mask=window_mask()),
                               atol=2e-5, rtol=2e-5)  # fp32 summation order


# ALiBi: its own kernels take the restriction.

@pytest.mark.parametrize("name", ["sliding_window", "block_sparse", "s2_groups"])
def test_alibi_kernel_honours_visible_forward_and_backward(name):
    """Block-wise ALiBi under a restriction == eager ALiBi given the pattern's definition as a mask (float64, 37
    tokens, GQA 4:2, blocks of 8; ``s2_groups`` differs per head)."""
    pattern, definition = PATTERNS[name]
    q, k, v = (t.requires_grad_() for t in random_qkv())
    pos = torch.arange(37)[None].expand(2, -1)
    slopes = alibi_slopes(4, torch.float64)
    out = alibi_attention(q, k, v, slopes, pos, pos, 0.3, block_size=8, visible=pattern)
    mask = definition_mask(definition, pos, pos)
    if mask.shape[1] == 1:
        ref = alibi_attention_eager(q, k, v, slopes, pos, pos, 0.3, attention_mask=mask)
    else:  # a per-head mask: one head at a time through the eager reference
        ref = torch.cat([alibi_attention_eager(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v[:, h // 2:h // 2 + 1],
                                               slopes[h:h + 1], pos, pos, 0.3, attention_mask=mask[:, h:h + 1])
                         for h in range(4)], dim=2)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(alibi_attention_eager(q, k, v, slopes, pos, pos, 0.3, visible=pattern), ref)
    upstream = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), upstream), torch.autograd.grad(ref, (q, k, v), upstream)):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r)


def test_alibi_with_block_sparse_equals_alibi_given_the_block_map_as_a_mask():
    model = lce.patch(make_tiny_llama(), "alibi", block_size=8, attention=BLOCKS)
    assert model.config._attn_implementation == "lce_alibi_block_sparse"
    reference = lce.patch(make_tiny_llama(), "alibi", kernel="eager")
    torch.testing.assert_close(logits(model, IDS), logits(reference, IDS, attention_mask=block_mask()),
                               atol=2e-5, rtol=2e-5)  # fp32 summation order
    assert (logits(model, IDS) - logits(reference, IDS)).abs().max() > 1e-2
    eager = lce.patch(make_tiny_llama(), "alibi", kernel="eager", attention=BLOCKS)
    torch.testing.assert_close(logits(eager, IDS), logits(model, IDS), atol=2e-5, rtol=2e-5)
    every = lce.patch(make_tiny_llama(), "alibi", block_size=8, attention={**BLOCKS, "random_blocks": 8})
    torch.testing.assert_close(logits(every, IDS), logits(reference, IDS), atol=2e-5, rtol=2e-5)
    assert_decode_matches_full(model, IDS, prefill=11)


def test_alibi_with_block_sparse_training_matches_the_masked_reference():
    model = lce.patch(make_tiny_llama(), "alibi", block_size=8, attention=BLOCKS).train()
    enable_activation_checkpointing(model)
    model(IDS, labels=IDS).loss.backward()
    reference = lce.patch(make_tiny_llama(), "alibi", kernel="eager").train()
    reference(IDS, labels=IDS, attention_mask=block_mask()).loss.backward()
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        assert torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, ref.grad, atol=1e-5, rtol=1e-4)  # fp32 summation order, two layers


# DCA: segmented_attention takes the restriction; dca.py's registered kernel does not pass it on yet.

def dca_segments_and_rotation():
    model = make_tiny_llama()
    geometry = Dca(chunk_size=8, local_window=2).geometry_for(model.config)
    return geometry, adapter_for(model).rotation(model.model.rotary_emb)


def test_segmented_attention_honours_visible_forward_and_backward():
    """DCA's three segments under a sliding window with a sink == the same segments given the window as a mask."""
    geometry, rotation = dca_segments_and_rotation()
    q, k, v = (t.requires_grad_() for t in random_qkv(dim=16))
    pos = torch.arange(37)[None].expand(2, -1)
    window = SlidingWindowPattern(window=7, sink_tokens=2)
    out = segmented_attention(q, k, v, geometry.segments(), rotation, pos, pos, 0.3, block_size=8, visible=window)
    mask = definition_mask(lambda i, j: (i - j < 7) | (j < 2), pos, pos)
    ref = segmented_attention(q, k, v, geometry.segments(), rotation, pos, pos, 0.3, mask, block_size=64)
    torch.testing.assert_close(out, ref)
    upstream = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), upstream), torch.autograd.grad(ref, (q, k, v), upstream)):
        torch.testing.assert_close(g, r)


def patch_dca_with_visible(model, attention):
    """DCA exactly as ``posenc=dca`` computes it, through a kernel that passes ``visible`` on to
    ``segmented_attention``, composed with ``attention`` by ``PatchTarget.restrict``."""
    target = PatchTarget(model, adapter_for(model))
    geometry = Dca(chunk_size=8, local_window=2).geometry_for(model.config)
    rotation = target.rotate_in_attention("dca")

    class DcaByHand(LayerAttention):
        handles = frozenset({RESTRICTION})

        def __call__(self, module, query, key, value, attention_mask, scaling, dropout, *, q_pos, k_pos,
                     visible=None, **kwargs):
            query = query * (dca_mscale(q_pos + 1, geometry.pretraining_length) ** 2)[:, None, :, None]
            return segmented_attention(query, key, value, geometry.segments(), rotation, q_pos, k_pos, scaling,
                                       attention_mask, block_size=8, visible=visible), None

    target.compute_attention("dca", lambda index, module: DcaByHand())
    lce.attention.ATTENTIONS.build(attention).apply(target)
    target.finalize()
    return model


def test_dca_with_sliding_window_equals_dca_given_the_window_as_a_mask():
    model = patch_dca_with_visible(make_tiny_llama(), WINDOW)
    assert model.config._attn_implementation == "lce_dca_sliding_window"
    reference = lce.patch(make_tiny_llama(), "dca", chunk_size=8, local_window=2)
    torch.testing.assert_close(logits(model, IDS), logits(reference, IDS, attention_mask=window_mask()),
                               atol=2e-5, rtol=2e-5)  # fp32 summation order
    assert (logits(model, IDS) - logits(reference, IDS)).abs().max() > 1e-2
    assert_decode_matches_full(model, IDS, prefill=11)


def test_registered_dca_composes_with_sliding_window():
    model = lce.patch(make_tiny_llama(), "dca", chunk_size=8, local_window=2, attention=WINDOW)
    torch.testing.assert_close(logits(model, IDS), logits(patch_dca_with_visible(make_tiny_llama(), WINDOW), IDS))


@pytest.mark.parametrize("posenc,params", [("self_extend", {"group_size": 2, "neighbor_window": 4}),
                                           ("rerope", {"window": 4})])
def test_segment_methods_compose_with_sliding_window(posenc, params):
    """Self-Extend / ReRoPE + sliding window == the unrestricted method given the window as a padding-style mask."""
    model = lce.patch(make_tiny_llama(), posenc, attention=WINDOW, **params)
    reference = lce.patch(make_tiny_llama(), posenc, **params)
    torch.testing.assert_close(logits(model, IDS), logits(reference, IDS, attention_mask=window_mask()),
                               atol=2e-5, rtol=2e-5)  # fp32 summation order
    assert_decode_matches_full(model, IDS, prefill=11)


# The mechanism's guards.

def test_computations_that_do_not_handle_restrictions_are_refused_at_patch_time():
    model = make_tiny_llama()
    with pytest.raises(LceError, match=r"attention=sliding_window restricts which keys each query sees, but the "
                                       r"attention computation of posenc=sinks does not honour restrictions"):
        lce.patch(model, "sinks", start_size=2, recent_size=8, attention=WINDOW)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.model.layers[0].self_attn, "lce_plan")
    assert torch.equal(logits(model, IDS), logits(make_tiny_llama(), IDS))


def test_two_restrictions_and_bidirectional_models_are_refused():
    target = PatchTarget(make_tiny_llama(), adapter_for(make_tiny_llama()), group="attention")
    SlidingWindow(window=4).apply(target)
    with pytest.raises(LceError, match="attention=sliding_window and attention=sliding_window both restrict attention"):
        SlidingWindow(window=8).apply(target)
    bidirectional = make_tiny_llama(use_bidirectional_attention=True)
    with pytest.raises(UnsupportedModelError, match="attention=sliding_window restricts causal attention, but llama "
                                                    "attention is bidirectional"):
        SlidingWindow(window=4).apply(PatchTarget(bidirectional, adapter_for(bidirectional), group="attention"))


def test_errors_name_each_method_by_its_config_group():
    """An attention variant and a position encoding that both own the attention computation are named as the configs
    name them (``posenc=dca``, ``attention=linear_elu``), whichever applies first; the model is left unpatched."""
    model = make_tiny_llama()
    with pytest.raises(LceError, match=r"^attention=linear_elu and posenc=dca both replace the attention computation; "
                                       r"they cannot be combined$"):
        lce.patch(model, "dca", attention="linear_elu")
    assert not hasattr(model, "_lce_patch") and model.config._attn_implementation == "sdpa"
    with pytest.raises(UnsupportedModelError, match=r"^attention=linear_elu replaces the attention computation, but "
                                                    r"gemma2 attention needs softcap"):
        lce.patch(family_model("gemma2"), "rope", attention="linear_elu")
    with pytest.raises(UnsupportedModelError, match=r"^posenc=alibi replaces the attention computation, but gemma2 "
                                                    r"attention needs softcap"):
        lce.patch(family_model("gemma2"), "alibi")


def test_a_restriction_can_switch_off_per_call():
    """``Restriction.at`` returning None (S²-Attn outside training) runs the layer's unrestricted attention."""

    class TrainingOnly(SlidingWindowPattern):
        def at(self, module, kv_len):
            return self if module.training else None

    model = make_tiny_llama()
    target = PatchTarget(model, adapter_for(model))
    target.restrict("window_in_training", lambda index, module: TrainingOnly(window=3))
    target.finalize()
    assert torch.equal(logits(model, IDS), logits(make_tiny_llama(), IDS))
    with torch.no_grad():
        trained = model.train()(IDS).logits
    torch.testing.assert_close(trained, logits(make_tiny_llama(), IDS, attention_mask=window_mask(3, 0)),
                               atol=2e-5, rtol=2e-5)
    assert isinstance(model.model.layers[0].self_attn.lce_plan.restriction, Restriction)


def test_s2_attn_with_alibi_in_training():
    """S²-Attn's per-head groups through ALiBi's kernel == eager ALiBi given the per-head mask."""
    ids = IDS[:, :28]  # 4 groups of 7
    model = lce.patch(make_tiny_llama(), "alibi", block_size=8, attention="s2_attn").train()
    i, j = torch.arange(28)[:, None], torch.arange(28)[None]
    groups = ShiftedGroups(7, 4)(i[None], j[None])
    with torch.no_grad():
        out = model(ids).logits
        reference = lce.patch(make_tiny_llama(), "alibi", kernel="eager").train()
        ref = reference(ids, attention_mask=groups.expand(2, -1, -1, -1)).logits  # [B, H, T, T]: per head
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)  # fp32 summation order


def test_saved_sparse_patch_reloads(tmp_path):
    model = lce.patch(make_tiny_llama(), "alibi", block_size=8, attention={**BLOCKS, "layers": [1]})
    lce.save_model(model, lce.data.ByteTokenizer(), tmp_path)
    loaded, _ = lce.load_model(str(tmp_path))
    assert loaded.config._attn_implementation == "lce_alibi_block_sparse"
    assert loaded.model.layers[0].self_attn.lce_plan.restriction is None
    torch.testing.assert_close(logits(loaded, IDS), logits(model, IDS))
