"""Frequency-scaling methods on a tiny Llama (training length L = 32): identity at factor 1, prefill + decode ==
full forward, a checkpointed training step, unpatch, and checkpoints that reload in lce and in vanilla transformers.

Dynamic-method specifics (decoding within L, the KV-cache caveat beyond it, statelessness, bf16) are in
``test_dynamic.py``.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers import logging as hf_logging

import lce
from lce.train.loop import enable_activation_checkpointing
from tests.conftest import assert_decode_matches_full, logits, make_tiny_llama

L = 32
STATIC = ["pi", "ntk", "yarn", "llama3", "longrope"]
DYNAMIC = ["dynamic_ntk", "dynamic_yarn"]
METHODS = STATIC + DYNAMIC
# Non-default parameters, so that a test cannot pass by falling back to defaults.
PARAMS = {
    "pi": {"factor": 3.0},
    "ntk": {"factor": 3.0},
    "yarn": {"factor": 3.0, "beta_fast": 16.0, "beta_slow": 0.5},
    "llama3": {"factor": 6.0, "low_freq_factor": 1.5, "high_freq_factor": 6.0},
    "longrope": {"factor": 3.0, "short_factor": [1.0, 1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.4],
                 "long_factor": [1.0, 1.1, 1.3, 1.7, 2.2, 2.6, 2.9, 3.0]},
    "dynamic_ntk": {"factor": 2.0},
    "dynamic_yarn": {"beta_fast": 16.0},
}


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    """transformers warns that llama3's original_max_position_embeddings is not below max_position_embeddings."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(level)


def ids(length: int, seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


def patched(method: str, **params) -> torch.nn.Module:
    return lce.patch(make_tiny_llama(max_position_embeddings=L), method, **{**PARAMS[method], **params})


@pytest.mark.parametrize("method", ["pi", "ntk", "yarn", "longrope"])
def test_factor_one_is_the_unpatched_model(method):
    """At s = 1 PI, NTK, YaRN (mscale 1) and LongRoPE (all-one factors, su multiplier 1) are RoPE, bit for bit."""
    extra = {"short_factor": [1.0] * 8, "long_factor": [1.0] * 8} if method == "longrope" else {}
    model, reference = patched(method, factor=1.0, **extra), make_tiny_llama(max_position_embeddings=L)
    assert torch.equal(logits(model, ids(2 * L)), logits(reference, ids(2 * L)))


def test_llama3_factor_one_is_the_unpatched_model_up_to_rounding():
    """At s = 1 the blended band computes (1 - smooth) * theta + smooth * theta, which may round 1 ulp off theta."""
    model, reference = patched("llama3", factor=1.0), make_tiny_llama(max_position_embeddings=L)
    torch.testing.assert_close(logits(model, ids(2 * L)), logits(reference, ids(2 * L)), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", DYNAMIC)
def test_dynamic_methods_are_the_unpatched_model_within_the_training_length(method):
    """Dynamic scaling starts past L (dynamic_ntk even at factor 1 changes the base beyond L)."""
    model, reference = patched(method), make_tiny_llama(max_position_embeddings=L)
    assert torch.equal(logits(model, ids(L)), logits(reference, ids(L)))
    assert not torch.allclose(logits(model, ids(2 * L)), logits(reference, ids(2 * L)))


@pytest.mark.parametrize("method", STATIC)
def test_methods_change_the_model(method):
    reference = make_tiny_llama(max_position_embeddings=L)
    assert (logits(patched(method), ids(2 * L)) - logits(reference, ids(2 * L))).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["pi", "ntk", "yarn", "llama3"])
def test_decode_matches_full_forward_across_the_training_length(method):
    """Static frequencies: cached keys carry the same rotation a full forward gives them, at any length."""
    assert_decode_matches_full(patched(method), ids(L + 9, batch=1), prefill=L - 7)


def test_longrope_decode_matches_full_forward_beyond_the_training_length():
    """LongRoPE picks its factor list from the current length: a prefill past L keeps the long list throughout.
    (A decode that crosses L keeps short-factor keys in the cache: the KV-cache caveat of test_dynamic.py.)"""
    assert_decode_matches_full(patched("longrope"), ids(L + 13, batch=1), prefill=L + 2)


@pytest.mark.parametrize("method", METHODS)
def test_training_step_with_gradient_checkpointing(method):
    model = patched(method)
    model.train()
    enable_activation_checkpointing(model)
    batch = ids(2 * L)
    loss = model(batch, labels=batch).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("method", METHODS)
def test_patch_then_unpatch_equals_never_patched(method):
    model = make_tiny_llama(max_position_embeddings=L)
    before, rotary = logits(model, ids(2 * L)), model.model.rotary_emb
    rope_parameters = dict(model.config.rope_parameters)
    lce.patch(model, method, **PARAMS[method])
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    lce.unpatch(model)
    assert torch.equal(logits(model, ids(2 * L)), before)
    assert model.model.rotary_emb is rotary and model.config.rope_parameters == rope_parameters
    assert not hasattr(model.config, "lce")


@pytest.mark.parametrize("method", METHODS)
def test_patches_replace_each_other(method):
    model = patched(method)
    expected = logits(patched("pi"), ids(2 * L))
    lce.patch(model, "pi", **PARAMS["pi"])
    assert torch.equal(logits(model, ids(2 * L)), expected)


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_round_trip(method, tmp_path):
    model = patched(method)
    lce.save_model(model, lce.data.ByteTokenizer(), tmp_path)
    loaded, _ = lce.load_model(str(tmp_path))
    assert loaded.config.lce["posenc"] == model.config.lce["posenc"]
    assert type(loaded.model.rotary_emb) is type(model.model.rotary_emb)
    assert torch.equal(logits(loaded, ids(2 * L)), logits(model, ids(2 * L)))


@pytest.mark.parametrize("method", STATIC)
def test_saved_checkpoint_loads_in_vanilla_transformers(method, tmp_path):
    """The rope_parameters lce writes are transformers' own types: no lce needed to get the same model."""
    model = patched(method)
    lce.save_model(model, lce.data.ByteTokenizer(), tmp_path)
    vanilla = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert vanilla.config.rope_parameters == model.config.rope_parameters
    for length in (L, 2 * L):  # longrope: both factor lists
        assert torch.equal(logits(vanilla, ids(length)), logits(model, ids(length)))


def test_dynamic_ntk_checkpoint_loads_in_vanilla_transformers(tmp_path):
    """Vanilla transformers loads it as its own dynamic NTK: equal within L, and for one call beyond L up to fp32
    rounding of the base (transformers computes it in fp32 from a tensor length, lce in fp64; see test_dynamic)."""
    model = patched("dynamic_ntk")
    lce.save_model(model, lce.data.ByteTokenizer(), tmp_path)
    vanilla = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert vanilla.config.rope_parameters == {"rope_theta": 10000.0, "rope_type": "dynamic", "factor": 2.0}
    assert torch.equal(logits(vanilla, ids(L)), logits(model, ids(L)))
    torch.testing.assert_close(logits(vanilla, ids(2 * L)), logits(model, ids(2 * L)), atol=1e-5, rtol=1e-5)


def test_dynamic_yarn_checkpoint_loads_in_vanilla_transformers_as_plain_rope(tmp_path):
    """No transformers type for dynamic YaRN: vanilla gets the unpatched model, lce.load_model the patched one."""
    model = patched("dynamic_yarn")
    lce.save_model(model, lce.data.ByteTokenizer(), tmp_path)
    vanilla = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert vanilla.config.rope_parameters["rope_type"] == "default"
    unpatched = make_tiny_llama(max_position_embeddings=L)
    assert torch.equal(logits(vanilla, ids(2 * L)), logits(unpatched, ids(2 * L)))
