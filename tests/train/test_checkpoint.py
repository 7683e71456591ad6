"""Checkpoints: exact round trip of weights, AdamW state and RNG; optimizer state by parameter name (a checkpoint of
another format is refused by name); atomic naming; pruning; no pickle on load."""

import json
import pickle
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lce.errors import LceError
from lce.train import TrainConfig, latest_checkpoint, load_checkpoint, prune, read_state, save_checkpoint
from lce.train.checkpoint import checkpoint_dir, full_optimizer_state
from lce.train.objective import build_optimizer
from tests.conftest import make_tiny_llama

CFG = TrainConfig(steps=10, seq_len=16)


def trained_pair(seed: int = 0, steps: int = 2):
    """A tiny model and its AdamW after ``steps`` updates (so the optimizer has state)."""
    model = make_tiny_llama(seed).train()
    optimizer = build_optimizer(model, CFG)
    ids = torch.randint(2, 259, (2, 16), generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def save(out_dir, step, model=None, optimizer=None):
    if model is None:
        model, optimizer = trained_pair()
    return save_checkpoint(out_dir, step, model, full_optimizer_state(model, optimizer), data_position=3 * step,
                           epoch=0, config=CFG, extra={"note": "hi"})


def assert_same_optimizer_state(want: torch.optim.Optimizer, got: torch.optim.Optimizer):
    want, got = want.state_dict(), got.state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert want["state"].keys() == got["state"].keys()
    for index, values in want["state"].items():
        assert values.keys() == got["state"][index].keys()
        for name, tensor in values.items():
            assert torch.equal(tensor, got["state"][index][name]), (index, name)


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, optimizer = trained_pair(seed=0)
    path = save(tmp_path, 2, model, optimizer)
    torch_draw, np_draw, py_draw = torch.rand(3), np.random.rand(3), random.random()

    other, other_opt = trained_pair(seed=1, steps=1)
    state = load_checkpoint(path, other, other_opt)

    assert torch.equal(torch.rand(3), torch_draw)
    assert np.array_equal(np.random.rand(3), np_draw)
    assert random.random() == py_draw
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert other.lm_head.weight is other.model.embed_tokens.weight  # still tied
    assert_same_optimizer_state(optimizer, other_opt)
    assert float(other_opt.state_dict()["state"][0]["step"]) == 2.0
    assert state["global_step"] == 2 and state["data_position"] == 6 and state["epoch"] == 0
    assert state["config"] == json.loads(json.dumps(CFG.__dict__)) and state["extra"] == {"note": "hi"}


def test_layout(tmp_path):
    path = save(tmp_path, 7)
    assert path == tmp_path / "checkpoints" / "step_00000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json",
    ]
    assert read_state(path)["global_step"] == 7


def test_optimizer_state_is_stored_by_parameter_name(tmp_path):
    model, optimizer = trained_pair()
    path = save(tmp_path, 1, model, optimizer)
    state = read_state(path)
    assert state["format"] == 2
    names = [name for name, _ in model.named_parameters()]  # the tied output layer is one parameter, listed once
    assert [n for group in state["optimizer_param_groups"] for n in group["params"]] == [
        n for n in names if model.get_parameter(n).dim() >= 2] + [n for n in names if model.get_parameter(n).dim() < 2]
    stored = load_file(path / "optimizer.safetensors")
    assert set(stored) == {f"state.{n}.{key}" for n in names for key in ("step", "exp_avg", "exp_avg_sq")}


@pytest.mark.parametrize("stored", [1, None, 3], ids=["format-1", "no-format", "format-3"])
def test_a_checkpoint_of_another_format_is_refused_by_name(tmp_path, stored):
    """Only the name-keyed layout is read; any other ``format`` (or none) is an error naming it, never a misread."""
    model, optimizer = trained_pair(seed=0)
    path = save(tmp_path, 2, model, optimizer)
    state = read_state(path)
    state.pop("format")
    if stored is not None:
        state["format"] = stored
    (path / "state.json").write_text(json.dumps(state))
    other, other_opt = trained_pair(seed=1, steps=1)
    with pytest.raises(LceError, match=rf"checkpoint .*step_00000002 has format {stored!r}; this lce reads format 2"):
        load_checkpoint(path, other, other_opt)


def test_latest_picks_highest_complete_step(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    model, optimizer = trained_pair()
    for step in (1, 3, 2):
        save(tmp_path, step, model, optimizer)
    # A save killed before its rename, and a directory without state.json (written last), are not checkpoints.
    leftover = tmp_path / "checkpoints" / ".tmp-step_00000009"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    checkpoint_dir(tmp_path, 10).mkdir()
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 3)


def test_prune_keeps_newest(tmp_path):
    model, optimizer = trained_pair()
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, optimizer)
    (tmp_path / "checkpoints" / ".tmp-step_00000005").mkdir()
    deleted = prune(tmp_path, keep=2)
    assert len(deleted) == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]


def test_resave_same_step_replaces(tmp_path):
    model, optimizer = trained_pair()
    save(tmp_path, 4, model, optimizer)
    with torch.no_grad():
        model.model.norm.weight.fill_(2.0)
    path = save(tmp_path, 4, model, optimizer)
    fresh = make_tiny_llama()
    load_checkpoint(path, fresh, restore_rng=False)
    assert torch.all(fresh.model.norm.weight == 2.0)


def test_load_never_unpickles(tmp_path, monkeypatch):
    model, optimizer = trained_pair()
    path = save(tmp_path, 1, model, optimizer)

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    other, other_opt = trained_pair(seed=1)
    load_checkpoint(path, other, other_opt)
    assert torch.equal(other.model.norm.weight, model.model.norm.weight)


def test_non_tensor_optimizer_state_is_refused(tmp_path):
    model, optimizer = trained_pair()
    optimizer.state[next(iter(optimizer.state))]["custom"] = 3
    with pytest.raises(TypeError, match="custom"):
        save(tmp_path, 1, model, optimizer)
