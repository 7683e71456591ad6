"""TrainConfig validation: every bad value is a ConfigError naming the field."""

import pytest

from lce.config import from_mapping
from lce.errors import ConfigError
from lce.train import TrainConfig


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


def test_grad_clip_zero_and_val_every_zero_are_allowed():
    TrainConfig(grad_clip=0.0, val_every=0)
