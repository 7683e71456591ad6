"""Model loading: the tiny Llama from a config, HF models from local files, clear errors offline."""

import time

import pytest
import torch

import lce
from lce.errors import ConfigError, LceError


def test_tiny_llama_is_seeded_and_byte_level():
    a, tokenizer = lce.load_model("tiny_llama", seed=3, hidden_size=64, num_hidden_layers=1)
    b, _ = lce.load_model({"name": "tiny_llama", "hidden_size": 64, "num_hidden_layers": 1}, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.config.vocab_size == tokenizer.vocab_size == 259
    assert a.model.rotary_emb.inv_freq.dtype == torch.float32


def test_building_a_model_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    lce.load_model("tiny_llama", hidden_size=32, num_hidden_layers=1)
    assert torch.equal(torch.rand(3), expected)


def test_hf_model_from_local_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ") } | {"[UNK]": 27, "</s>": 28}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]").save_pretrained(tmp_path)

    model, tokenizer = lce.load_model(str(tmp_path), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # dtype= keeps rotary frequencies in fp32
    assert tokenizer.eos_id == 28
    assert tokenizer.encode("ab").tolist() == [0, 1]


def test_missing_model_offline_fails_fast():
    start = time.monotonic()
    with pytest.raises(LceError,
                       match=r"model\.path='no-such-org/no-such-model' could not be loaded and HF_HUB_OFFLINE=1"):
        lce.load_model("no-such-org/no-such-model")
    assert time.monotonic() - start < 5, "offline loading must not retry"


def test_local_directory_without_config_is_named(tmp_path):
    with pytest.raises(LceError, match="has no config.json"):
        lce.load_model(str(tmp_path))


def test_bad_model_parameters():
    with pytest.raises(ConfigError, match=r"model\.hidden_sise: unknown key \(did you mean 'hidden_size'\?\)"):
        lce.load_model("tiny_llama", hidden_sise=64)
    with pytest.raises(ConfigError, match=r"model\.dtype: 'fp8' is not allowed"):
        lce.load_model({"name": "hf", "path": "x", "dtype": "fp8"})


def test_list_functions():
    assert {"rope", "nope"} <= set(lce.list_posencs())
    assert "full" in lce.list_attentions()
