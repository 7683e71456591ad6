"""sliding_window on a tiny Llama: the patched model equals the unpatched one given the window as an explicit 4D mask
(transformers' own SDPA path; logits and training gradients), window >= T is the unpatched model, decode == full
forward, padding, hybrids keep the other layers bit-identical, unpatching, every supported family, and clear errors."""

import pytest
import torch

import lce
from lce.errors import ConfigError
from lce.train.loop import enable_activation_checkpointing
from tests.attention.test_blockwise import definition_mask
from tests.conftest import assert_close_to_reference, assert_decode_matches_full, fp64_logits, logits, make_tiny_llama
from tests.hf.test_adapters import FAMILIES, family_model
from tests.hf.test_adapters import IDS as FAMILY_IDS

IDS = torch.randint(3, 259, (2, 29), generator=torch.Generator().manual_seed(0))
POS = torch.arange(29)[None].expand(2, -1)


def window_mask(window, sinks=0):
    return definition_mask(lambda i, j: (i - j < window) | (j < sinks), POS, POS)


def sliding(window, sinks=0, **extra):
    return {"name": "sliding_window", "window": window, "sink_tokens": sinks, "query_block": 8, **extra}


def test_window_covering_the_sequence_is_the_unpatched_model():
    model = lce.patch(make_tiny_llama(), "rope", attention=sliding(29))
    assert model.config._attn_implementation == "lce_sliding_window"
    # Block-wise softmax vs SDPA: the same sums in another order (fp32).
    stock = make_tiny_llama()
    assert_close_to_reference(logits(model, IDS), logits(stock, IDS), fp64_logits(stock, IDS))


@pytest.mark.parametrize("window,sinks", [(6, 0), (5, 3), (1, 0)], ids=["w6", "w5_sinks3", "w1"])
def test_equals_the_unpatched_model_with_the_window_as_a_mask(window, sinks):
    model = lce.patch(make_tiny_llama(), "rope", attention=sliding(window, sinks))
    reference = logits(make_tiny_llama(), IDS, attention_mask=window_mask(window, sinks))
    torch.testing.assert_close(logits(model, IDS), reference, atol=2e-5, rtol=2e-5)  # fp32 summation order
    assert (logits(model, IDS) - logits(make_tiny_llama(), IDS)).abs().max() > 1e-2


def test_decode_matches_full_forward():
    model = lce.patch(make_tiny_llama(), "rope", attention=sliding(6, 2))
    assert_decode_matches_full(model, IDS, prefill=11)


def test_left_padding_does_not_change_real_tokens():
    model = lce.patch(make_tiny_llama(), "rope", attention=sliding(5, 2))
    ids = IDS[:1, :15]
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 15, dtype=torch.long)], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = logits(model, padded, attention_mask=mask, position_ids=position_ids)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 6:], logits(model, ids), atol=2e-5, rtol=2e-5)  # fp32 summation order


def training_grads(model, **kwargs):
    model.train()
    loss = model(IDS, labels=IDS, **kwargs).loss
    loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters()}


def test_training_step_with_activation_checkpointing_matches_the_masked_reference():
    model = lce.patch(make_tiny_llama(), "rope", attention=sliding(6, 2))
    enable_activation_checkpointing(model)
    loss, grads = training_grads(model)
    ref_loss, ref_grads = training_grads(make_tiny_llama(), attention_mask=window_mask(6, 2))
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        # fp32 gradients through two layers: summation-order differences of ~1e-7 relative, amplified.
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_hybrid_keeps_the_other_layers_bit_identical():
    model = lce.patch(make_tiny_llama(), "rope", attention=sliding(4, layers=[1]))
    reference = make_tiny_llama()
    with torch.no_grad():
        out = model(IDS, output_hidden_states=True)
        ref = reference(IDS, output_hidden_states=True)
    assert model.model.layers[0].self_attn.lce_plan.restriction is None
    assert model.model.layers[1].self_attn.lce_plan.restriction is not None
    assert torch.equal(out.hidden_states[1], ref.hidden_states[1])  # layer 0: transformers' SDPA, untouched
    assert (out.logits - ref.logits).abs().max() > 1e-2
    every = lce.patch(make_tiny_llama(), "rope", attention=sliding(4))
    assert (logits(every, IDS) - out.logits).abs().max() > 1e-3


def test_unpatch_restores_the_model(tiny_model):
    before = logits(tiny_model, IDS)
    lce.patch(tiny_model, "rope", attention=sliding(4))
    lce.unpatch(tiny_model)
    assert torch.equal(logits(tiny_model, IDS), before)
    assert tiny_model.config._attn_implementation == "sdpa"
    assert not hasattr(tiny_model.model.layers[0].self_attn, "lce_plan")


@pytest.mark.parametrize(
    "params,message",
    [({"window": 0}, r"attention\.window: must be >= 1"), ({"window": -3}, r"attention\.window: must be >= 1"),
     ({"sink_tokens": -1}, r"attention\.sink_tokens: must be >= 0"),
     ({"query_block": 0}, r"attention\.query_block: must be >= 1"),
     ({"layers": []}, r"attention\.layers: selects no layer"),
     ({"layers": "every:0"}, r"attention\.layers: every:N needs N >= 1")],
)
def test_bad_parameters_are_clear_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        lce.patch(make_tiny_llama(), "rope", attention={"name": "sliding_window", **params})


def test_layer_index_out_of_range_is_a_clear_error():
    model = make_tiny_llama()
    with pytest.raises(ConfigError, match=r"attention\.layers: layer indices \[2\] are out of range for a model of 2"):
        lce.patch(model, "rope", attention=sliding(4, layers=[0, 2]))
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "_lce_patch")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_window_covering_the_sequence_is_the_unpatched_model(family):
    """Soft-capping (Gemma 2), the families' own sliding-window layers, partial rotary, NoPE layers: lce's
    block-wise kernel reproduces each family's attention; decode == full forward under a real window."""
    model = lce.patch(family_model(family), "rope", attention=sliding(FAMILY_IDS.shape[1]))
    stock = family_model(family)  # fp32 summation order differs: as close to fp64 as the stock model is
    assert_close_to_reference(logits(model, FAMILY_IDS), logits(stock, FAMILY_IDS), fp64_logits(stock, FAMILY_IDS))
    assert_decode_matches_full(lce.patch(family_model(family), "rope", attention=sliding(5, 1)), FAMILY_IDS,
                               prefill=9)
