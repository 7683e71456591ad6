"""TrainConfig validation: every bad value is a ConfigError naming the field; the values that switch something off
(grad_clip=0, val_every=0) are allowed and do switch it off."""

import dataclasses
import json

import pytest
import torch

from lce.config import from_mapping
from lce.errors import ConfigError
from lce.train import TrainConfig, train
from lce.train import loop as loop_module
from tests.conftest import make_tiny_llama


def test_message_names_field_and_value():
    with pytest.raises(ConfigError, match=r"^train\.grad_accum: must be >= 1, got 0$"):
        TrainConfig(grad_accum=0)


@pytest.mark.parametrize(
    "values, field",
    [
        pytest.param({"grad_accum": 0}, "train.grad_accum", id="grad_accum-0"),
        pytest.param({"steps": 0}, "train.steps", id="steps-0"),
        pytest.param({"betas": [0.9, 0.95, 0.99]}, "train.betas", id="betas-len-3"),
        pytest.param({"betas": [0.9, 1.0]}, "train.betas", id="beta-1"),
        pytest.param({"lr": -1e-3}, "train.lr", id="negative-lr"),
        pytest.param({"keep_checkpoints": 0}, "train.keep_checkpoints", id="keep_checkpoints-0"),
        pytest.param({"mixed_precision": "fp8"}, "train.mixed_precision", id="unknown-mixed_precision"),
        pytest.param({"facter": 2}, "train.facter", id="unknown-key"),
        pytest.param({"min_lr_ratio": 1.5}, "train.min_lr_ratio", id="min_lr_ratio-above-1"),
        pytest.param({"warmup_steps": -1}, "train.warmup_steps", id="negative-warmup"),
        pytest.param({"val_every": -1}, "train.val_every", id="negative-val_every"),
        pytest.param({"seq_len": 0}, "train.seq_len", id="seq_len-0"),
        pytest.param({"eps": 0}, "train.eps", id="eps-0"),
        pytest.param({"max_nonfinite_steps": 0}, "train.max_nonfinite_steps", id="max_nonfinite_steps-0"),
        pytest.param({"steps": "many"}, "train.steps", id="steps-not-int"),
    ],
)
def test_bad_values(values, field):
    with pytest.raises(ConfigError) as info:
        from_mapping(TrainConfig, values, "train")
    assert str(info.value).startswith(field + ":")


def test_from_mapping_coerces_yaml_values():
    cfg = from_mapping(TrainConfig, {"lr": "3e-4", "steps": 10.0, "seed": None, "betas": [0.9, 0.99]}, "train")
    assert cfg.lr == 3e-4 and cfg.steps == 10 and cfg.seed is None and cfg.betas == [0.9, 0.99]


TINY = TrainConfig(steps=3, seq_len=16, micro_batch_size=2, lr=3e-3, warmup_steps=0, log_every=1, val_every=0,
                   loss_chunk_size=24, mixed_precision="no")
BLOCKS = torch.randint(2, 259, (6, 17), generator=torch.Generator().manual_seed(0))


def trained(cfg: TrainConfig, out_dir, **kwargs) -> tuple[dict, list[dict]]:
    """The weights and the step log of a run of ``cfg`` on a tiny Llama."""
    model = make_tiny_llama()
    result = train(model, BLOCKS, cfg, out_dir, progress=False, **kwargs)
    return model.state_dict(), [json.loads(line) for line in result.log_path.read_text().splitlines()]


def test_grad_clip_zero_updates_by_the_unclipped_gradient(tmp_path):
    unclipped, log = trained(dataclasses.replace(TINY, grad_clip=0.0), tmp_path / "zero")
    tight = min(r["grad_norm"] for r in log) / 2  # a threshold that clips every step
    # A threshold above every norm scales each gradient by exactly 1, as no clipping does: the same weights.
    loose_weights, loose_log = trained(dataclasses.replace(TINY, grad_clip=1e9), tmp_path / "loose")
    clipped_weights, _ = trained(dataclasses.replace(TINY, grad_clip=tight), tmp_path / "tight")
    assert [r["grad_norm"] for r in log] == [r["grad_norm"] for r in loose_log]
    assert all(torch.equal(value, loose_weights[name]) for name, value in unclipped.items())
    # AdamW divides a gradient by its own magnitude, but clipping by another factor at each step still moves it.
    assert not all(torch.equal(value, clipped_weights[name]) for name, value in unclipped.items())


def test_val_every_zero_runs_no_validation(tmp_path, monkeypatch):
    monkeypatch.setattr(loop_module, "validation_loss", lambda *args, **kwargs: pytest.fail("validation ran"))
    _, log = trained(dataclasses.replace(TINY, val_every=0), tmp_path, val_blocks=BLOCKS[:2])
    assert len(log) == TINY.steps and not any("val_loss" in r for r in log)
