"""Bad training settings are one-line errors before any step runs: lengths beyond the position encoding, a missing
checkpoint to resume, accumulation below 1."""

import pytest
import torch

import lce
from lce.errors import ConfigError
from lce.train import TrainConfig, train
from lce.train.limits import supported_length
from tests.conftest import make_tiny_llama

CFG = {"micro_batch_size": 2, "val_every": 0, "steps": 1, "warmup_steps": 0}


def blocks(seq_len: int, n: int = 4) -> torch.Tensor:
    return torch.randint(2, 259, (n, seq_len + 1))


@pytest.mark.parametrize("posenc,params,bound", [
    ("rope", {}, None),
    ("pi", {"factor": 2.0}, 128),
    ("yarn", {"factor": 4.0}, 256),
    ("dynamic_ntk", {}, None),
    ("self_extend", {"group_size": 4, "neighbor_window": 16}, (64 - 16) * 4 + 16),  # (L - W) * G + W
], ids=lambda v: v if isinstance(v, str) else None)
def test_supported_length(posenc, params, bound):
    assert supported_length(lce.patch(make_tiny_llama(), posenc, **params))[0] == bound  # tiny Llama: L = 64


def test_seq_len_above_the_scaled_range_is_refused(tmp_path):
    model = lce.patch(make_tiny_llama(), "pi", factor=2.0)
    with pytest.raises(ConfigError, match=r"train\.seq_len: 256 is above the 128 positions .* rope_type=linear "
                                          r"\(factor 2 x original length 64\)"):
        train(model, blocks(256), TrainConfig(seq_len=256, **CFG), tmp_path, progress=False)
    pose = TrainConfig(seq_len=16, pose_target_len=512, **CFG)
    with pytest.raises(ConfigError, match=r"train\.pose_target_len: 512 is above the 128 positions"):
        train(model, torch.randint(2, 259, (4, 5 * 17)), pose, tmp_path, progress=False)


def test_missing_resume_dir_is_refused(tmp_path):
    cfg = TrainConfig(seq_len=16, resume_from=str(tmp_path / "nowhere"), **CFG)
    with pytest.raises(ConfigError, match=r"train\.resume_from: .*nowhere does not exist"):
        train(make_tiny_llama(), blocks(16), cfg, tmp_path / "run", progress=False)
    (tmp_path / "empty").mkdir()
    cfg = TrainConfig(seq_len=16, resume_from=str(tmp_path / "empty"), **CFG)
    with pytest.raises(ConfigError, match=r"train\.resume_from: .*empty holds no checkpoint"):
        train(make_tiny_llama(), blocks(16), cfg, tmp_path / "run", progress=False)


def test_resume_from_another_run_continues_it(tmp_path):
    data = blocks(16, 8)
    first = train(make_tiny_llama(), data, TrainConfig(seq_len=16, **CFG), tmp_path / "a", progress=False)
    cfg = TrainConfig(seq_len=16, resume_from=str(tmp_path / "a"), **{**CFG, "steps": 2})
    result = train(make_tiny_llama(seed=3), data, cfg, tmp_path / "b", progress=False)
    assert first.steps == 1 and result.resumed_from == 1 and result.steps == 2


def test_accumulation_below_one_is_refused():
    with pytest.raises(ConfigError, match=r"train\.grad_accum: must be >= 1, got 0"):
        TrainConfig(grad_accum=0)
