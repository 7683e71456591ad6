"""Dynamic NTK and dynamic YaRN: stateless per-forward frequencies that equal transformers' formulas at every
length, fp32 after a bf16 cast, and the KV-cache caveat made concrete (tiny Llama, training length L = 32)."""

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers import logging as hf_logging
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import lce
from lce.posenc import frequencies as F
from lce.posenc.dynamic import DynamicNtkRotary, DynamicYarnRotary
from tests.conftest import (
    assert_close_to_reference,
    assert_decode_matches_full,
    decode_logits,
    fp64_logits,
    logits,
    make_tiny_llama,
)

L = 32
DYNAMIC = ["dynamic_ntk", "dynamic_yarn"]


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(level)


def ids(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


def patched(method: str, **params):
    return lce.patch(make_tiny_llama(max_position_embeddings=L), method, **params)


def static_model(**rope) -> LlamaForCausalLM:
    """The tiny Llama (same weights) with fixed rope_parameters, built by transformers alone."""
    model = make_tiny_llama(max_position_embeddings=L)
    model.config.rope_parameters = {"rope_theta": 10000.0, **rope}
    model.model.rotary_emb = LlamaRotaryEmbedding(model.config)
    return model


@pytest.mark.parametrize("length", [1, L - 1, L, L + 1, 40, 2 * L, 100, 1000, 10_000])
@pytest.mark.parametrize("factor", [1.0, 2.0, 7.5])
def test_dynamic_ntk_equals_transformers_dynamic_for_one_call(length, factor):
    """A fresh transformers ``dynamic`` rotary module called once at ``length`` == lce's module at that length.

    transformers computes the new base in fp32 from a tensor length, lce in fp64 from an int (exact agreement with
    ``ROPE_INIT_FUNCTIONS["dynamic"]`` given an int length is in test_frequency.py), so inv_freq agrees to 2 ulp
    (rtol 3e-7) and an angle ``p * theta`` to ``p * theta * 3e-7``: cos/sin atol ``1e-6 + 3e-7 * length``.
    """
    model = patched("dynamic_ntk", factor=factor)
    assert model.config.rope_parameters == {"rope_theta": 10000.0, "rope_type": "dynamic", "factor": factor}
    hf = LlamaRotaryEmbedding(model.config)
    x, positions = torch.zeros(1, 1, 1), torch.arange(length)[None]
    (cos, sin), (hf_cos, hf_sin) = model.model.rotary_emb(x, positions), hf(x, positions)
    torch.testing.assert_close(model.model.rotary_emb.frequencies(length)[0], hf.inv_freq, rtol=3e-7, atol=0)
    tol = 1e-6 + 3e-7 * length
    torch.testing.assert_close(cos, hf_cos, rtol=0, atol=tol)
    torch.testing.assert_close(sin, hf_sin, rtol=0, atol=tol)
    if length <= L:
        assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)


@pytest.mark.parametrize("length", [20, L, 40, 77])
def test_dynamic_ntk_forward_is_static_ntk_at_its_length(length):
    """One forward of length l == transformers' plain RoPE with rope_theta = b'(l), bit for bit."""
    base = F.dynamic_ntk_base(10000.0, 2.0, 16, length, L)
    reference = static_model(rope_type="default", rope_theta=base)
    assert torch.equal(logits(patched("dynamic_ntk", factor=2.0), ids(length)), logits(reference, ids(length)))


@pytest.mark.parametrize("length", [40, 77])
def test_dynamic_yarn_forward_is_yarn_at_its_length(length):
    """One forward of length l == transformers' YaRN with factor l / L (fp32: the blend rounds differently, 2 ulp in
    inv_freq, see test_frequency.py)."""
    reference = static_model(rope_type="yarn", factor=length / L, original_max_position_embeddings=L,
                             beta_fast=32.0, beta_slow=1.0)
    torch.testing.assert_close(logits(patched("dynamic_yarn"), ids(length)), logits(reference, ids(length)),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", DYNAMIC)
def test_stateless_a_longer_forward_before_changes_nothing(method):
    """Perplexity at length 40 must not depend on whether a length-100 forward ran before."""
    model = patched(method)
    batch = ids(40)
    fresh = model(batch, labels=batch)
    with torch.no_grad():
        model(ids(100, seed=1))
    after = model(batch, labels=batch)
    assert torch.equal(after.logits, fresh.logits) and torch.equal(after.loss, fresh.loss)


@pytest.mark.parametrize("method", DYNAMIC)
def test_stateless_sweep_order_does_not_matter(method):
    lengths = [20, 40, 64, 100]
    results = {}
    for order in (lengths, lengths[::-1]):
        model = patched(method)
        results[tuple(order)] = {n: logits(model, ids(n, seed=n)) for n in order}
    forward, backward = results.values()
    assert all(torch.equal(forward[n], backward[n]) for n in lengths)


def test_transformers_dynamic_is_stateful_contrast():
    """Documented contrast: transformers' own ``dynamic`` keeps the base of the longest length seen (it resets only
    below L), so the same length-40 forward gives different logits after a length-100 one."""
    model = static_model(rope_type="dynamic", factor=1.0)
    fresh = logits(model, ids(40))
    logits(model, ids(100, seed=1))
    assert not torch.allclose(logits(model, ids(40)), fresh)
    assert torch.equal(logits(patched("dynamic_ntk", factor=1.0), ids(40)), fresh)


@pytest.mark.parametrize("method", DYNAMIC)
def test_frequencies_stay_fp32_after_a_bf16_cast(method):
    """``model.to(bfloat16)`` casts buffers; the module recomputes inv_freq in fp32 from Python scalars anyway, so
    its cos/sin are the fp32 values rounded once to bf16 (a bf16 inv_freq would be off by up to 2^-9 relative)."""
    model = patched(method)
    fp32_rotary = type(model.model.rotary_emb)(**_init_args(model.model.rotary_emb))
    model.to(torch.bfloat16)
    rotary = model.model.rotary_emb
    x, positions = torch.zeros(1, 1, 1, dtype=torch.bfloat16), torch.arange(3 * L)[None]
    inv_freq, _ = rotary.frequencies(3 * L)
    assert inv_freq.dtype == torch.float32
    cos, sin = rotary(x, positions)
    ref_cos, ref_sin = fp32_rotary(x.float(), positions)
    assert cos.dtype == torch.bfloat16
    assert torch.equal(cos, ref_cos.to(torch.bfloat16)) and torch.equal(sin, ref_sin.to(torch.bfloat16))
    assert torch.isfinite(logits(model, ids(3 * L))).all()


def _init_args(rotary) -> dict:
    common = {"dim": rotary.dim, "base": rotary.base, "original_length": rotary.original_length, "style": rotary.style}
    if isinstance(rotary, DynamicNtkRotary):
        return {**common, "factor": rotary.factor}
    assert isinstance(rotary, DynamicYarnRotary)
    return {**common, **{k: getattr(rotary, k) for k in (
        "beta_fast", "beta_slow", "truncate", "attention_factor", "mscale", "mscale_all_dim")}}


@pytest.mark.parametrize("method", DYNAMIC)
def test_decode_matches_full_forward_within_the_training_length(method):
    assert_decode_matches_full(patched(method), ids(L, batch=2), prefill=5)


@pytest.mark.parametrize("method", DYNAMIC)
def test_kv_cache_caveat_decoding_past_the_training_length(method):
    """Keys are cached after rotation: decoding past L keeps each key's rotation from the step that computed it,
    a full forward rotates all keys with the final length's frequencies. So decode == full forward while the
    sequence is within L (the first L logits), and differs beyond (documented, not a bug of lce)."""
    model = patched(method, **({"factor": 4.0} if method == "dynamic_ntk" else {}))
    batch = ids(2 * L)
    decoded, full = decode_logits(model, batch, prefill=8), logits(model, batch)
    within = batch[:, :L]  # fp32 summation order differs from the full forward's
    assert_close_to_reference(decoded[:, :L], logits(model, within), fp64_logits(model, within))
    assert (decoded[:, L:] - full[:, L:]).abs().amax(dim=-1).min() > 1e-4  # every step past L: 5x the fp32 noise


def test_dynamic_yarn_attention_factor_replaces_the_temperature_beyond_the_training_length():
    model = patched("dynamic_yarn", attention_factor=1.0)
    assert model.model.rotary_emb.frequencies(4 * L)[1] == 1.0
    model = patched("dynamic_yarn", attention_factor=0.5)
    assert model.model.rotary_emb.frequencies(4 * L)[1] == 0.5 and model.model.rotary_emb.frequencies(L)[1] == 1.0
    model = patched("dynamic_yarn", mscale=0.707, mscale_all_dim=0.707)  # DeepSeek-style ratio: 1
    assert model.model.rotary_emb.frequencies(4 * L)[1] == 1.0
    assert patched("dynamic_yarn").model.rotary_emb.frequencies(4 * L)[1] == F.yarn_mscale(4.0)


def test_dynamic_ntk_with_another_original_length_keeps_rope_parameters():
    """transformers' ``dynamic`` scales from max_position_embeddings; with another L lce cannot express the method
    in rope_parameters, so it leaves them (vanilla transformers would load plain RoPE) and relies on config.lce."""
    model = patched("dynamic_ntk", original_max_position_embeddings=16)
    assert model.config.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}
    assert model.model.rotary_emb.original_length == 16
    reference = static_model(rope_theta=F.dynamic_ntk_base(10000.0, 1.0, 16, 24, 16), rope_type="default")
    assert torch.equal(logits(model, ids(24)), logits(reference, ids(24)))


def test_rotation_for_attention_kernels():
    """``rotation(l)`` exposes the per-length rotation as a ``Rotation`` (fp32)."""
    rotary = patched("dynamic_yarn").model.rotary_emb
    rotation = rotary.rotation(3 * L)
    inv_freq, mscale = F.yarn_inv_freq(16, 10000.0, 3.0, L)
    assert torch.equal(rotation.inv_freq, inv_freq) and rotation.attention_scaling == mscale
    assert rotation.inv_freq.dtype == torch.float32 and rotation.rotary_dim == 16
