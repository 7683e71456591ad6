"""Per-instance patching: rope is the identity, nope removes position information exactly, unpatch restores, two
models in one process never affect each other, and a saved patch reloads."""

from copy import deepcopy

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

import lce
from lce.errors import ConfigError, LceError
from lce.hf.adapters import ADAPTERS
from lce.train.loop import enable_activation_checkpointing
from tests.conftest import assert_decode_matches_full, logits, make_tiny_llama


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
    # Decoding attends over a cache one query at a time: same math, different reduction order.
    assert_decode_matches_full(tiny_model, ids, prefill=12)


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
    enable_activation_checkpointing(tiny_model)
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


@pytest.mark.parametrize("posenc", ["rope", "dca"])
def test_bf16_cast_rotary_is_refused(tiny_model, posenc):
    """Cast before patching: refused before any method copies the damaged frequencies (DCA's rotation would)."""
    tiny_model.to(torch.bfloat16)
    with pytest.raises(LceError, match="inv_freq is torch.bfloat16, not float32: the model was cast with "
                                       r".to\(\)/.half\(\) before lce patched it"):
        lce.patch(tiny_model, posenc)
    assert not hasattr(tiny_model, "_lce_patch")


class LookAlike(nn.Module):
    """Has a ``config`` of a supported family but is no transformers model."""

    def __init__(self):
        super().__init__()
        self.config = make_tiny_llama().config
        self.linear = nn.Linear(2, 2)


NOT_TRANSFORMERS = {  # what is passed -> how the error names it
    "module-with-config": (LookAlike, r"tests\.hf\.test_patch\.LookAlike \(it has a \.config of model_type 'llama'\)"),
    "object": (object, r"builtins\.object"),
    "module": (lambda: nn.Linear(2, 2), r"torch\.nn\.modules\.linear\.Linear"),
}


@pytest.mark.parametrize("kind", NOT_TRANSFORMERS)
def test_non_transformers_models_are_refused(kind):
    build, named = NOT_TRANSFORMERS[kind]
    with pytest.raises(lce.UnsupportedModelError, match=rf"^got a {named}, not a Hugging Face transformers model: "
                                                        r"lce patches PreTrainedModel instances .* of the families "
                                                        r"llama, mistral"):
        lce.patch(build(), "rope")


def test_rope_theta_must_be_positive_and_finite_at_patch_time():
    """A config built or loaded with a bad base gives NaN frequencies; patching names it instead of running on NaN."""
    model = make_tiny_llama(rope_theta=-1.0)
    with pytest.raises(ConfigError, match=r"^config\.rope_parameters: rope_theta=-1\.0 must be a finite number > 0"):
        lce.patch(model, "yarn", factor=2.0)
    assert not hasattr(model, "_lce_patch")
    gemma3 = _family_model("gemma3_text")
    gemma3.config.rope_parameters["full_attention"]["rope_theta"] = float("nan")
    with pytest.raises(ConfigError, match=r"^config\.rope_parameters\['full_attention'\]: rope_theta=nan must be"):
        lce.patch(gemma3, "rope")


CASTS = {
    "half": (lambda model: model.half(), torch.float16),
    "to_bf16": (lambda model: model.to(torch.bfloat16), torch.bfloat16),
    "bfloat16": (lambda model: model.bfloat16(), torch.bfloat16),
    "to_device_dtype": (lambda model: model.to("cpu", torch.bfloat16), torch.bfloat16),
}
FP32_PATCHES = {  # a plain patch, a frequency method (rebuilt rotary module), rotate-in-attention and no rotation
    "rope": {"name": "rope"},
    "yarn": {"name": "yarn", "factor": 4.0},
    "dca": {"name": "dca", "chunk_size": 48, "local_window": 8},
    "alibi": {"name": "alibi"},
}


@pytest.fixture(scope="module")
def saved_tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "m"
    make_tiny_llama().save_pretrained(path)
    return path


def rotary_frequency_tensors(model) -> dict:
    """Every frequency table lce's patch rotates with: the rotary module's floating buffers and the ``Rotation``s
    kept in each layer's attention plan for the fused kernel."""
    tensors = {name: buf for name, buf in model.model.rotary_emb.named_buffers() if buf.is_floating_point()}
    for index, layer in enumerate(model.model.layers):
        fused = getattr(getattr(layer.self_attn, "lce_plan", None), "fused", None)
        if fused is not None and fused.rotary is not None:
            tensors[f"layer {index} rotation"] = fused.rotary.inv_freq
    return tensors


@pytest.mark.parametrize("cast", CASTS)
@pytest.mark.parametrize("posenc", FP32_PATCHES)
def test_casting_a_patched_model_keeps_rotary_frequencies_fp32(posenc, cast, saved_tiny_llama):
    """``model.half()`` / ``.to(torch.bfloat16)`` after patching == ``from_pretrained(dtype=...)`` then patching: the
    same bf16/fp16 weights with fp32 frequencies, so the logits are identical, far past the training length too."""
    to_dtype, dtype = CASTS[cast]
    model = to_dtype(lce.patch(make_tiny_llama(), FP32_PATCHES[posenc]))
    loaded = LlamaForCausalLM.from_pretrained(saved_tiny_llama, dtype=dtype).eval()
    reference = lce.patch(loaded, FP32_PATCHES[posenc])
    assert next(model.parameters()).dtype == dtype
    frequencies = rotary_frequency_tensors(model)
    assert frequencies and all(f.dtype == torch.float32 for f in frequencies.values()), frequencies
    ids = torch.randint(3, 259, (1, 96), generator=torch.Generator().manual_seed(6))
    far = {} if posenc == "dca" else {"position_ids": torch.arange(100_000 - 96, 100_000)[None]}
    assert torch.equal(logits(model, ids, **far), logits(reference, ids, **far))


def test_cast_without_the_guard_would_destroy_positions(saved_tiny_llama):
    """Why the guard exists: a stock model cast after loading rotates with bf16 frequencies (HF_V5.md item 5)."""
    cast = make_tiny_llama().to(torch.bfloat16)
    assert cast.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    loaded = LlamaForCausalLM.from_pretrained(saved_tiny_llama, dtype=torch.bfloat16).eval()
    x, far = torch.zeros(1, 96, 64, dtype=torch.bfloat16), torch.arange(100_000 - 96, 100_000)[None]
    cos_cast, cos_loaded = cast.model.rotary_emb(x, far)[0], loaded.model.rotary_emb(x, far)[0]
    assert (cos_cast.float() - cos_loaded.float()).abs().max() > 1  # the angles are wrong by radians


def test_device_moves_and_copies_keep_the_guard(tiny_model):
    lce.patch(tiny_model, "yarn", factor=2.0)
    tiny_model.to("meta", torch.bfloat16)  # a device move goes through, the dtype cast does not
    inv_freq = tiny_model.model.rotary_emb.inv_freq
    assert (inv_freq.device.type, inv_freq.dtype) == ("meta", torch.float32)
    assert tiny_model.model.embed_tokens.weight.dtype == torch.bfloat16
    copy = deepcopy(lce.patch(make_tiny_llama(), "yarn", factor=2.0)).half()
    assert copy.model.rotary_emb.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("posenc", ["rope", "yarn", "nope"])
def test_unpatch_restores_the_unguarded_original(tiny_model, posenc):
    """The original rotary module comes back as it was: a later cast casts it, as for any stock model."""
    rotary = tiny_model.model.rotary_emb
    lce.patch(tiny_model, FP32_PATCHES.get(posenc, posenc))
    tiny_model.half()
    lce.unpatch(tiny_model)
    assert tiny_model.model.rotary_emb is rotary and "_apply" not in vars(rotary)
    assert rotary.inv_freq.dtype == torch.float32  # guarded (rope) or detached (yarn, nope) while patched
    tiny_model.bfloat16()
    assert rotary.inv_freq.dtype == torch.bfloat16


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
