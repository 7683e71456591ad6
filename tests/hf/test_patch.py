"""Per-instance patching: rope is the identity, nope removes position information exactly, unpatch restores, two
models in one process never affect each other, and a saved patch reloads."""

import pytest
import torch

import lce
from lce.errors import ConfigError, LceError
from lce.hf.adapters import ADAPTERS
from tests.conftest import make_tiny_llama


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.fixture
def ids():
    return torch.randint(3, 259, (2, 37), generator=torch.Generator().manual_seed(0))


def test_rope_is_identity(tiny_model, ids):
    before = logits(tiny_model, ids)
    lce.patch(tiny_model, "rope")
    assert torch.equal(logits(tiny_model, ids), before)


def test_nope_equals_a_model_without_rotation(tiny_model, ids):
    """NoPE must make attention position-blind: a causal model whose rotary returns cos=1, sin=0. Checked
    independently by recomputing logits with every rotation angle set to zero (inv_freq = 0)."""
    reference = make_tiny_llama()
    reference.model.rotary_emb.inv_freq.zero_()
    lce.patch(tiny_model, "nope")
    assert torch.equal(logits(tiny_model, ids), logits(reference, ids))
    assert not torch.equal(logits(tiny_model, ids), logits(make_tiny_llama(), ids))


def test_nope_is_blind_to_prefix_order():
    """In one NoPE layer a token attends to keys and values computed from single tokens, so its output depends on
    its prefix only as a multiset: permuting the prefix leaves the last token's logits unchanged (not under RoPE).
    (With more layers the prefix tokens' own states depend on their order through causality.)"""
    tiny_model = make_tiny_llama(num_hidden_layers=1)
    ids = torch.randint(3, 259, (1, 12), generator=torch.Generator().manual_seed(1))
    perm = torch.cat([torch.randperm(11, generator=torch.Generator().manual_seed(2)), torch.tensor([11])])
    rope_a, rope_b = logits(tiny_model, ids)[0, -1], logits(tiny_model, ids[:, perm])[0, -1]
    lce.patch(tiny_model, "nope")
    nope_a, nope_b = logits(tiny_model, ids)[0, -1], logits(tiny_model, ids[:, perm])[0, -1]
    # fp32 attention sums the same terms in another order: equal up to rounding (1e-5), not bit-exact.
    torch.testing.assert_close(nope_a, nope_b, atol=1e-5, rtol=1e-5)
    assert (rope_a - rope_b).abs().max() > 1e-3


@pytest.mark.parametrize("posenc", ["rope", "nope"])
def test_patch_then_unpatch_equals_never_patched(tiny_model, ids, posenc):
    before = logits(tiny_model, ids)
    rotary = tiny_model.model.rotary_emb
    rope_parameters = dict(tiny_model.config.rope_parameters)
    lce.patch(tiny_model, posenc)
    lce.unpatch(tiny_model)
    assert torch.equal(logits(tiny_model, ids), before)
    assert tiny_model.model.rotary_emb is rotary
    assert tiny_model.config.rope_parameters == rope_parameters
    assert not hasattr(tiny_model.config, "lce")


def test_patches_replace_each_other(tiny_model, ids):
    before = logits(tiny_model, ids)
    lce.patch(tiny_model, "nope")
    lce.patch(tiny_model, "rope")
    assert torch.equal(logits(tiny_model, ids), before)


def test_two_models_are_independent(ids):
    baseline, patched = make_tiny_llama(), make_tiny_llama()
    before = logits(baseline, ids)
    lce.patch(patched, "nope")
    assert torch.equal(logits(baseline, ids), before)
    assert not torch.equal(logits(patched, ids), before)


def test_spec_forms_are_equivalent(tiny_model):
    from omegaconf import OmegaConf

    from lce.posenc.nope import Nope

    for spec in ["nope", {"name": "nope"}, OmegaConf.create({"name": "nope"}), Nope()]:
        lce.patch(tiny_model, spec)
        assert tiny_model.config.lce["posenc"] == {"name": "nope", "logn": False, "logn_length": None}


def test_prefill_then_decode_equals_full_forward(tiny_model):
    ids = torch.randint(3, 259, (1, 20), generator=torch.Generator().manual_seed(3))
    lce.patch(tiny_model, "nope")
    full = logits(tiny_model, ids)
    with torch.no_grad():
        out = tiny_model(ids[:, :12], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(12, 20):
            out = tiny_model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    # Decoding attends over a cache one query at a time: same math, different reduction order (fp32, 1e-5).
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_padding_mask_still_applies(tiny_model):
    """Left padding must not change the logits of the real tokens (the mask reaches attention)."""
    lce.patch(tiny_model, "nope")
    ids = torch.randint(3, 259, (1, 10), generator=torch.Generator().manual_seed(4))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    torch.testing.assert_close(logits(tiny_model, padded, attention_mask=mask)[:, 3:], logits(tiny_model, ids),
                               atol=1e-5, rtol=1e-5)  # fp32 sums over a different number of masked terms


def test_training_step_with_gradient_checkpointing_is_finite(tiny_model):
    lce.patch(tiny_model, "nope")
    tiny_model.train()
    tiny_model.activation_checkpointing_enable()
    ids = torch.randint(3, 259, (2, 16))
    loss = tiny_model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_save_and_load_round_trip(tiny_model, ids, tmp_path):
    lce.patch(tiny_model, "nope")
    lce.save_model(tiny_model, lce.data.ByteTokenizer(), tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded, tokenizer = lce.load_model(str(tmp_path / "m"))
    assert loaded.config.lce["posenc"]["name"] == "nope"
    assert torch.equal(logits(loaded, ids), logits(tiny_model, ids))
    assert isinstance(tokenizer, lce.data.ByteTokenizer)


def test_saved_tokenizer_loads_in_vanilla_transformers(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = lce.data.ByteTokenizer()
    tokenizer.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "def f(x):\n    return x  # é"
    assert hf(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text).tolist()


def test_bad_input_is_a_clear_error(tiny_model):
    with pytest.raises(ConfigError, match=r"unknown posenc 'yarnn'.*available: .*nope.*rope"):
        lce.patch(tiny_model, "yarnn")
    with pytest.raises(ConfigError, match=r"posenc\.factor: unknown key; allowed keys: logn, logn_length, name"):
        lce.patch(tiny_model, "nope", factor=2)
    with pytest.raises(ConfigError, match=r"a 'name' is required"):
        lce.patch(tiny_model, {"factor": 2})
    with pytest.raises(LceError, match="not patched"):
        lce.unpatch(tiny_model)


def test_unsupported_family_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(lce.UnsupportedModelError, match=r"'gpt2'.*supported families: llama"):
        lce.patch(model, "nope")


def test_bf16_cast_rotary_is_refused(tiny_model):
    tiny_model.to(torch.bfloat16)
    with pytest.raises(LceError, match="inv_freq is torch.bfloat16"):
        lce.patch(tiny_model, "rope")


from tests.hf.test_adapters import family_model as _family_model


@pytest.mark.parametrize("family", sorted(ADAPTERS))
def test_every_family_patches_and_scores(family):
    """Each adapter: chunked logits equal the model's own, nope changes the output, unpatch restores it."""
    from lce.hf.lm import hidden_states, logits_from_hidden

    model = _family_model(family)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(5))
    before = logits(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(logits_from_hidden(model, hidden_states(model, ids)), before, atol=0, rtol=0)
    lce.patch(model, "nope")
    assert not torch.equal(logits(model, ids), before)
    lce.unpatch(model)
    assert torch.equal(logits(model, ids), before)
