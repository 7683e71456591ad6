"""Model loading: the tiny Llama from a config, HF models from local files, clear errors offline."""

import re
import time
from pathlib import Path

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
    """A path of the form of a hub id that is no local directory is looked up in the Hugging Face cache only."""
    start = time.monotonic()
    with pytest.raises(LceError, match=r"^model\.path='no-such-org/no-such-model' is neither a local directory "
                                       r"\(/\S+/no-such-org/no-such-model does not exist\) nor in the Hugging Face "
                                       r"cache, and HF_HUB_OFFLINE=1 forbids downloading it$"):
        lce.load_model("no-such-org/no-such-model")
    assert time.monotonic() - start < 5, "offline loading must not retry"


@pytest.mark.parametrize("path", ["outputs/quickstart/rope/model", "./foo", "../no/such", "~/no-such-lce-dir/x/y"])
def test_missing_local_directory_is_named(path, tmp_path, monkeypatch):
    """A path that does not exist and cannot be a hub id (which is 'name' or 'namespace/name') is a missing
    directory, named absolutely, not transformers' "Repo id must be in the form..."."""
    monkeypatch.chdir(tmp_path)
    expected = (Path(path).expanduser() if path.startswith("~") else tmp_path / path).absolute()
    with pytest.raises(LceError, match=rf"^model\.path='{re.escape(path)}': no such directory: "
                                       rf"{re.escape(str(expected))} \(nor a hub id"):
        lce.load_model(path)


def test_existing_relative_directory_is_local(tmp_path, monkeypatch):
    """A path that exists is a local directory, even when it also has the form of a hub id."""
    model, tokenizer = lce.load_model("tiny_llama", hidden_size=32, num_hidden_layers=1)
    lce.save_model(model, tokenizer, tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    loaded, _ = lce.load_model("org/name")
    assert loaded.config.hidden_size == 32


def test_local_directory_without_config_is_named(tmp_path):
    with pytest.raises(LceError, match="has no config.json"):
        lce.load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(LceError, match=r"weights\.bin is a file; set a Hugging Face model directory"):
        lce.load_model(str(tmp_path / "weights.bin"))


@pytest.fixture
def saved_tiny(tmp_path):
    model, tokenizer = lce.load_model("tiny_llama", hidden_size=32, num_hidden_layers=1)
    return lce.save_model(model, tokenizer, tmp_path / "m")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupted_safetensors_is_named(saved_tiny, damage):
    weights = saved_tiny / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": bytes(range(256)) * 8, "empty": b""}[damage])
    with pytest.raises(LceError, match=rf"^model\.path='.*': {re.escape(str(weights))} is not a valid safetensors "
                                       r"file \(truncated or corrupted: .*\); save or download it again$"):
        lce.load_model(str(saved_tiny))


def test_model_directory_without_tokenizer_loads_with_a_warning(tmp_path):
    """A plain ``save_pretrained`` has no tokenizer: the model loads, the tokenizer is None, and the warning says how
    to give one; ``tokenizer=`` then loads it from elsewhere."""
    from tests.conftest import make_tiny_llama

    make_tiny_llama(num_hidden_layers=1).save_pretrained(tmp_path / "m")
    with pytest.warns(UserWarning, match=r"there is no tokenizer in .*/m \(none of tokenizer\.json, .*\); the model "
                                         r"is loaded with tokenizer None\. Give one with model\.tokenizer="):
        model, tokenizer = lce.load_model(str(tmp_path / "m"))
    assert tokenizer is None and model.config.num_hidden_layers == 1
    lce.data.ByteTokenizer().save(tmp_path / "tok")
    _, tokenizer = lce.load_model(str(tmp_path / "m"), tokenizer=str(tmp_path / "tok"))
    assert tokenizer.encode("ab").tolist() == lce.data.ByteTokenizer().encode("ab").tolist()
    with pytest.raises(LceError, match=r"model\.tokenizer='.*/nowhere': the tokenizer could not be loaded"):
        lce.load_model(str(tmp_path / "m"), tokenizer=str(tmp_path / "nowhere"))


def test_save_model_refuses_a_file_path(tmp_path):
    model, tokenizer = lce.load_model("tiny_llama", hidden_size=32, num_hidden_layers=1)
    existing = tmp_path / "model.safetensors"
    existing.write_bytes(b"x")
    with pytest.raises(LceError, match=rf"^lce\.save_model: {re.escape(str(existing))} is a file, not a "
                                       r"directory; save to a directory path$"):
        lce.save_model(model, tokenizer, existing)
    with pytest.raises(LceError, match=rf"^lce\.save_model: {re.escape(str(existing))} is a file, not a "
                                       rf"directory, so {re.escape(str(existing / 'm'))} cannot be created in it"):
        lce.save_model(model, tokenizer, existing / "m")
    assert existing.read_bytes() == b"x"
    assert (lce.save_model(model, None, tmp_path / "a" / "b") / "model.safetensors").is_file()  # parents created


@pytest.mark.parametrize("theta", [-1.0, 0.0, float("nan"), float("inf")])
def test_rope_theta_must_be_positive_and_finite(theta, tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.rope_theta: must be a finite number > 0"):
        lce.load_model("tiny_llama", rope_theta=theta)
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(num_hidden_layers=1, rope_theta=theta)  # an HF config on disk is not validated
    lce.save_model(model, lce.data.ByteTokenizer(), tmp_path / "m")
    with pytest.raises(ConfigError, match=rf"^config\.rope_parameters: rope_theta={re.escape(repr(theta))} must be a "
                                          "finite number > 0"):
        lce.load_model(str(tmp_path / "m"))


def test_bad_model_parameters():
    with pytest.raises(ConfigError, match=r"model\.hidden_sise: unknown key \(did you mean 'hidden_size'\?\)"):
        lce.load_model("tiny_llama", hidden_sise=64)
    with pytest.raises(ConfigError, match=r"model\.dtype: 'fp8' is not allowed"):
        lce.load_model({"name": "hf", "path": "x", "dtype": "fp8"})


def test_list_functions():
    assert {"rope", "nope"} <= set(lce.list_posencs())
    assert "full" in lce.list_attentions()
