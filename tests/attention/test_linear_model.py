"""Linear attention inside Hugging Face models: prefill + token-by-token decoding equals one full forward (with an
O(1) state per token, recomputed exactly whenever the cache changes under it), left padding, hybrids that leave the
other layers untouched, a training step with activation checkpointing whose gradients match the reference form,
composition with position encodings, and clear refusals.

Tolerances: model logits in fp32 differ between forms and between decoding and a full forward only by summation order
(assert_decode_matches_full: at most 3x the full forward's own fp32 error against an fp64 copy). Gradients of the
chunked form under activation checkpointing vs the materialised reference without it: rtol 1e-4 / atol 1e-6, fp32
summation order through two layers, a loss and its backward (observed differences ~1e-6 relative).
"""

import copy

import pytest
import torch
import transformers

import lce
from lce.attention import linear
from lce.errors import ConfigError, LceError, UnsupportedModelError
from lce.hf import cache as hf_cache
from lce.hf.cache import RecurrentStateLayer
from lce.hf.dispatch import capture_recurrent_state
from lce.train.loop import enable_activation_checkpointing
from tests.attention.test_linear import VARIANTS
from tests.conftest import (
    assert_decode_matches_full,
    forward_cached,
    logits,
    make_tiny_llama,
)
from tests.hf.test_adapters import family_model

IDS = torch.randint(3, 259, (2, 23), generator=torch.Generator().manual_seed(0))


def linearized(name, model=None, posenc="rope", **params):
    model = model if model is not None else make_tiny_llama()
    return lce.patch(model, posenc, attention={"name": name, **VARIANTS[name], "chunk_size": 4, **params})


@pytest.fixture
def prefix_recomputes(monkeypatch):
    """Counts the times a kernel rebuilt a cached prefix's state from the cached keys and values (O(T))."""
    calls = []
    original = linear.linear_attention_chunked

    def spy(fq, *args, **kwargs):
        if fq is None:
            calls.append(1)
        return original(fq, *args, **kwargs)

    monkeypatch.setattr(linear, "linear_attention_chunked", spy)
    return calls


@pytest.mark.parametrize("name", VARIANTS)
def test_decode_matches_full_forward_with_a_constant_size_state(name, prefix_recomputes):
    model = linearized(name)
    assert not torch.allclose(logits(model, IDS), logits(make_tiny_llama(), IDS), atol=1e-3)  # it is not softmax
    assert_decode_matches_full(model, IDS, prefill=15)
    assert prefix_recomputes == []  # every decoding step continued from the saved state


def test_the_state_lives_on_the_cache_layers(prefix_recomputes):
    """Each linear layer keeps its state on its own KV cache layer (``lce.hf.cache.RecurrentStateLayer``), so a
    state dies with its cache; a copy of the cache starts without states, recomputes them once per layer and decodes
    as the original does."""
    model = linearized("retention")
    with torch.no_grad():
        cache = forward_cached(model, IDS[:, :12])[1]
        assert all(isinstance(layer, RecurrentStateLayer) and layer.recurrent_state(12) is not None
                   for layer in cache.layers)
        copied = copy.deepcopy(cache)
        original = forward_cached(model, IDS[:, 12:13], cache)[0].logits
        assert prefix_recomputes == []
        again = forward_cached(model, IDS[:, 12:13], copied)[0].logits
        assert len(prefix_recomputes) == 2
    torch.testing.assert_close(again, original, atol=2e-5, rtol=2e-5)  # fp32 summation order


def test_a_cache_lce_cannot_find_is_an_error_not_a_recomputation(monkeypatch):
    """If transformers hands the attention module its cache under a name lce does not know (as 5.24 did when it
    renamed ``past_key_values`` to ``cache``), decoding fails loudly instead of recomputing the prefix every token."""
    model = linearized("linear_elu")
    monkeypatch.setattr(hf_cache, "CACHE_ARGUMENTS", ("a_name_this_transformers_does_not_use",))
    with torch.no_grad():
        _, cache = forward_cached(model, IDS[:, :8])  # a prefill has no cached keys: fine
        with pytest.raises(LceError, match="found no KV cache among the attention module's arguments"):
            forward_cached(model, IDS[:, 8:9], cache)


def test_a_cache_without_layers_is_refused():
    model = linearized("linear_elu")

    class Opaque:
        def get_seq_length(self, layer_idx=0):
            return 0

    with torch.no_grad(), pytest.raises(UnsupportedModelError, match="Opaque passed to layer 0 has no per-layer"):
        capture_recurrent_state(0, model.model.layers[0].self_attn, (), {"cache": Opaque()})


def decode_padded(model, ids, mask, prefill):
    """Prefill + decoding of a left-padded batch (``mask`` 0 on padding), positions counted from the first token."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out, cache = forward_cached(model, ids[:, :prefill], attention_mask=mask[:, :prefill],
                                    position_ids=positions[:, :prefill])
        steps = [out.logits]
        for t in range(prefill, ids.shape[1]):
            out, cache = forward_cached(model, ids[:, t:t + 1], cache, attention_mask=mask[:, :t + 1],
                                        position_ids=positions[:, t:t + 1])
            steps.append(out.logits)
    return torch.cat(steps, 1)


@pytest.mark.parametrize("name", VARIANTS)
def test_left_padding_is_honoured(name):
    """Each row of a left-padded batch equals that row alone, in a full forward and in decoding (3 and 0 pads: a
    chunk boundary that moves with the padding)."""
    model = linearized(name)
    rows = [IDS[0, :17], IDS[1, :20]]
    ids = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), rows[0]]), rows[1]])
    mask = (torch.arange(20)[None] >= torch.tensor([[3], [0]])).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = logits(model, ids, attention_mask=mask, position_ids=positions)
    decoded = decode_padded(model, ids, mask, prefill=12)
    for b, (row, pad) in enumerate(zip(rows, (3, 0))):
        alone = logits(model, row[None])[0]
        torch.testing.assert_close(full[b, pad:], alone, atol=2e-5, rtol=2e-5)  # fp32 summation order
        torch.testing.assert_close(decoded[b, pad:], alone, atol=2e-5, rtol=2e-5)


def test_state_is_recomputed_when_the_cache_changes(prefix_recomputes):
    """Crop (speculative decoding rolls back), beam reordering and a second generation interleaved with the first:
    each invalidates or separates the saved states, and decoding stays equal to a full forward."""
    model = linearized("performer")  # the variant whose state also carries a running maximum
    other = torch.randint(3, 259, (2, 23), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = forward_cached(model, IDS[:, :12])[1]
        second = forward_cached(model, other[:, :9])[1]
        for t in range(12, 16):  # two generations, interleaved
            step = forward_cached(model, IDS[:, t:t + 1], cache)[0].logits
            torch.testing.assert_close(step[:, -1], logits(model, IDS[:, :t + 1])[:, -1], atol=2e-5, rtol=2e-5)
            step = forward_cached(model, other[:, t - 3:t - 2], second)[0].logits
            torch.testing.assert_close(step[:, -1], logits(model, other[:, :t - 2])[:, -1], atol=2e-5, rtol=2e-5)
        assert prefix_recomputes == []
        cache.crop(-3)  # back to 13 tokens; continue with different ones
        new = torch.cat([IDS[:, :13], other[:, :4]], 1)
        for t in range(13, 17):
            step = forward_cached(model, new[:, t:t + 1], cache)[0].logits
            torch.testing.assert_close(step[:, -1], logits(model, new[:, :t + 1])[:, -1], atol=2e-5, rtol=2e-5)
        assert len(prefix_recomputes) == 2  # once per layer, right after the crop
        cache.reorder_cache(torch.tensor([1, 0]))
        swapped = new[[1, 0]]
        step = forward_cached(model, IDS[:, 20:21], cache)[0].logits
        expected = logits(model, torch.cat([swapped, IDS[:, 20:21]], 1))[:, -1]
        torch.testing.assert_close(step[:, -1], expected, atol=2e-5, rtol=2e-5)
        assert len(prefix_recomputes) == 4


def test_hybrid_layers_keep_the_models_attention():
    """``every:2`` linearises layers 0 and 2 of 4; layers 1 and 3 run transformers' SDPA attention exactly as the
    unpatched model does on the same inputs (bit for bit), and the hybrid decodes like its full forward."""
    model = linearized("retention", make_tiny_llama(num_hidden_layers=4), layers="every:2")
    reference = make_tiny_llama(num_hidden_layers=4)
    kinds = [type(layer.self_attn.lce_plan.attention).__name__ for layer in model.model.layers]
    assert kinds == ["LinearLayerAttention", "NoneType", "LinearLayerAttention", "NoneType"]
    calls = {}

    def record(index):
        def hook(module, args, kwargs, output):
            calls[index] = (args, kwargs, output[0])
        return hook

    handles = [model.model.layers[i].self_attn.register_forward_hook(record(i), with_kwargs=True) for i in (1, 3)]
    logits(model, IDS)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        for i, (args, kwargs, output) in calls.items():
            assert torch.equal(reference.model.layers[i].self_attn(*args, **kwargs)[0], output)
    assert_decode_matches_full(model, IDS, prefill=15)


def test_hybrid_leaves_earlier_layers_identical():
    model = linearized("linear_elu", layers=[1])
    reference = make_tiny_llama()
    with torch.no_grad():
        hidden = model(IDS, output_hidden_states=True).hidden_states
        expected = reference(IDS, output_hidden_states=True).hidden_states
    assert torch.equal(hidden[1], expected[1]) and not torch.allclose(hidden[2], expected[2])


def training_gradients(model, checkpointing):
    model.train()
    if checkpointing:
        enable_activation_checkpointing(model)
    batch = torch.randint(3, 259, (2, 37), generator=torch.Generator().manual_seed(3))
    loss = model(batch, labels=batch).loss
    loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", VARIANTS)
def test_training_step_with_activation_checkpointing_matches_the_reference(name):
    loss, grads = training_gradients(linearized(name, chunk_size=8), checkpointing=True)
    ref_loss, ref_grads = training_gradients(linearized(name, form="parallel"), checkpointing=False)
    assert torch.isfinite(loss) and grads.keys() == ref_grads.keys()
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-4, atol=1e-6, msg=key)


def test_performer_redraw_every_forward_survives_activation_checkpointing():
    """Features redrawn at every training forward come from torch's global RNG, which activation checkpointing
    restores before recomputing: gradients equal those of the same draw without checkpointing."""
    torch.manual_seed(11)
    loss, grads = training_gradients(linearized("performer", redraw="every_forward"), checkpointing=True)
    torch.manual_seed(11)
    ref_loss, ref_grads = training_gradients(linearized("performer", redraw="every_forward"), checkpointing=False)
    torch.testing.assert_close(loss, ref_loss)
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("posenc", [{"name": "yarn", "factor": 4.0}, {"name": "pi", "factor": 2.0}])
def test_frequency_position_encodings_compose(posenc):
    """Frequency methods rotate q and k before attention: linear attention sees their rotation."""
    model = linearized("retention", posenc=posenc)
    assert not torch.allclose(logits(model, IDS), logits(linearized("retention"), IDS), atol=1e-4)
    assert_decode_matches_full(model, IDS, prefill=15)


@pytest.mark.parametrize("posenc", [{"name": "alibi"}, {"name": "dca"}, {"name": "rerope", "window": 8},
                                    {"name": "sinks", "start_size": 2, "recent_size": 8},
                                    {"name": "self_extend", "group_size": 4, "neighbor_window": 8}])
def test_position_encodings_with_their_own_kernel_are_refused(posenc):
    model = make_tiny_llama()
    with pytest.raises(LceError, match=rf"attention=linear_elu and posenc={posenc['name']} both replace the attention "
                                       "computation; they cannot be combined"):
        linearized("linear_elu", model, posenc=posenc)
    assert not hasattr(model, "_lce_patch")  # the failed patch left the model as it was
    assert torch.equal(logits(model, IDS), logits(make_tiny_llama(), IDS))


def test_softcapping_family_is_refused():
    with pytest.raises(UnsupportedModelError, match="linear_elu replaces the attention computation, but gemma2 "
                                                    "attention needs softcap, which it does not handle"):
        linearized("linear_elu", family_model("gemma2"))


def test_sliding_window_layers_are_refused_and_a_full_cache_works():
    config = {"vocab_size": 259, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    with pytest.raises(UnsupportedModelError, match=r"mistral layers \[0, 1\] are sliding_attention layers "
                                                    r"\(sliding_window=8\).*sliding_window=None.*attention\.layers"):
        linearized("linear_elu", transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=8,
                                                                                            **config)))
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **config)).eval()
    assert_decode_matches_full(linearized("linear_elu", model), IDS, prefill=15)


@pytest.mark.parametrize("family", ["gpt_neox", "cohere", "smollm3", "phi3"])
def test_other_families_decode_with_a_constant_size_state(family, prefix_recomputes):
    """GPT-NeoX passes its cache as ``layer_past``, Cohere rotates interleaved pairs, SmolLM3 has NoPE layers, Phi-3
    partial rotary: the state is found and decoding equals the full forward."""
    model = linearized("linear_elu", family_model(family))
    ids = IDS[:, :21] % 64
    assert_decode_matches_full(model, ids, 13)
    assert prefix_recomputes == []


def test_layer_index_out_of_range_is_named():
    with pytest.raises(ConfigError, match=r"attention\.layers: layer indices \[2\] are out of range for a model of "
                                          r"2 layers"):
        linearized("performer", layers=[0, 2])


def test_unpatch_restores_the_model_and_a_saved_model_reloads(tmp_path):
    model = linearized("performer")
    assert model.state_dict().keys() == make_tiny_llama().state_dict().keys()  # the pretrained parameters, no more
    patched = logits(model, IDS)
    lce.save_model(model, lce.data.ByteTokenizer(), tmp_path / "m")
    loaded, _ = lce.load_model(str(tmp_path / "m"))
    assert loaded.config.lce["attention"]["name"] == "performer"
    assert torch.equal(logits(loaded, IDS), patched)  # the fixed features are redrawn from the seed
    assert all(layer.self_attn._forward_pre_hooks for layer in model.model.layers)
    lce.unpatch(model)
    assert torch.equal(logits(model, IDS), logits(make_tiny_llama(), IDS))
    assert not any(layer.self_attn._forward_pre_hooks for layer in model.model.layers)  # the cache hooks are gone
    assert_decode_matches_full(model, IDS, prefill=15)
