"""The training loop end to end on a tiny Llama, and the resumable data order it relies on."""

import dataclasses
import json

import pytest
import torch

from lce.errors import ConfigError
from lce.train import TrainConfig, latest_checkpoint, train
from lce.train.checkpoint import checkpoint_dir
from tests.conftest import make_tiny_llama

SEQ = 16
BASE = TrainConfig(
    steps=6, seq_len=SEQ, micro_batch_size=2, grad_accum=1, lr=3e-3, warmup_steps=2, checkpoint_every=2,
    keep_checkpoints=2, log_every=1, val_every=0, loss_chunk_size=24, seed=None,
)


def random_blocks(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 259, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def read_log(path):
    """The JSONL step log at ``path`` as strict JSON (``json.dumps`` writes NaN, which is not JSON)."""
    return [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {path}"))
            for line in path.read_text().splitlines()]


class Recorder:
    """A logger that records metrics and, once, dies at ``kill_at`` like a killed process."""

    def __init__(self, kill_at: int | None = None):
        self.kill_at = kill_at
        self.calls = []

    def log_metrics(self, metrics, step):
        if step == self.kill_at:
            self.kill_at = None
            raise KeyboardInterrupt("killed")
        self.calls.append((step, metrics))


def test_repeated_batch_loss_falls(tmp_path):
    model = make_tiny_llama()
    repeated = random_blocks(1).expand(4, SEQ + 1).contiguous()
    cfg = dataclasses.replace(BASE, steps=8, micro_batch_size=4, lr=1e-2, warmup_steps=0, val_every=4)
    logger = Recorder()
    result = train(model, repeated, cfg, tmp_path, val_blocks=repeated[:2], logger=logger, progress=False)

    log = read_log(result.log_path)
    assert [r["step"] for r in log] == list(range(1, 9))
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in log)
    assert log[-1]["loss"] < log[0]["loss"] - 0.5
    assert log[3]["val_loss"] < log[0]["loss"] and "val_loss" in log[7] and "val_loss" not in log[4]
    assert [step for step, _ in logger.calls] == list(range(1, 9))
    assert {"train/loss", "train/lr", "train/grad_norm", "val/loss"} <= set(logger.calls[3][1])
    assert result.steps == 8 and result.resumed_from is None and result.final_loss == log[-1]["loss"]
    assert result.tokens_seen == 8 * 4 * SEQ and result.tokens_per_s > 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000006", "step_00000008"]
    assert not model.training


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path):
    # 10 blocks, 2 micro-batches of 2 per step: 5 batches per epoch, so the run crosses epochs mid-step.
    blocks = random_blocks(10)
    cfg = dataclasses.replace(BASE, grad_accum=2)
    model_a = make_tiny_llama()
    train(model_a, blocks, cfg, tmp_path / "a", progress=False)

    killed = dataclasses.replace(cfg, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        train(make_tiny_llama(), blocks, killed, tmp_path / "b", logger=Recorder(kill_at=3), progress=False)
    assert latest_checkpoint(tmp_path / "b").name == "step_00000002"
    model_b = make_tiny_llama(seed=1)  # different init: everything must come from the checkpoint
    result = train(model_b, blocks, killed, tmp_path / "b", logger=Recorder(), progress=False)

    log_a, log_b = read_log(tmp_path / "a" / "train_log.jsonl"), read_log(result.log_path)
    assert result.resumed_from == 2
    assert [r["step"] for r in log_b] == list(range(1, 7))
    assert [r["loss"] for r in log_b] == [r["loss"] for r in log_a]
    assert [r["grad_norm"] for r in log_b] == [r["grad_norm"] for r in log_a]
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


def test_grad_accum_matches_a_larger_micro_batch(tmp_path):
    blocks = random_blocks(8)
    one = dataclasses.replace(BASE, steps=1, micro_batch_size=4, grad_accum=1)
    two = dataclasses.replace(BASE, steps=1, micro_batch_size=2, grad_accum=2)
    log_one = read_log(train(make_tiny_llama(), blocks, one, tmp_path / "one", progress=False).log_path)
    log_two = read_log(train(make_tiny_llama(), blocks, two, tmp_path / "two", progress=False).log_path)
    # Same four blocks, same weights: only the order of floating-point sums differs (per micro-batch vs at once).
    assert log_two[0]["loss"] == pytest.approx(log_one[0]["loss"], abs=1e-6)
    assert log_two[0]["grad_norm"] == pytest.approx(log_one[0]["grad_norm"], rel=1e-5)


def test_gradient_checkpointing_run_is_finite(tmp_path):
    model = make_tiny_llama()
    cfg = dataclasses.replace(BASE, steps=2, gradient_checkpointing=True)
    result = train(model, random_blocks(8), cfg, tmp_path, progress=False)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert model.config.use_cache is False
    assert torch.isfinite(torch.tensor(result.final_loss))


def test_resume_with_different_lr_is_refused(tmp_path):
    blocks = random_blocks(8)
    cfg = dataclasses.replace(BASE, steps=1)
    train(make_tiny_llama(), blocks, cfg, tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"train\.lr: checkpoint 0\.003, now 0\.006"):
        train(make_tiny_llama(), blocks, dataclasses.replace(cfg, steps=2, lr=6e-3), tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"seed: checkpoint 0, now 1"):
        train(make_tiny_llama(), blocks, dataclasses.replace(cfg, steps=2), tmp_path, seed=1, progress=False)


def test_resume_compares_the_global_batch_not_grad_accum(tmp_path):
    blocks = random_blocks(8)
    cfg = dataclasses.replace(BASE, steps=1, grad_accum=2)
    train(make_tiny_llama(), blocks, cfg, tmp_path, progress=False)
    # One process: grad_accum is the whole global batch, so changing it changes the trajectory.
    with pytest.raises(ConfigError, match=r"micro_batches_per_step: checkpoint 2, now 1"):
        train(make_tiny_llama(), blocks, dataclasses.replace(cfg, steps=2, grad_accum=1), tmp_path, progress=False)
    assert train(make_tiny_llama(), blocks, dataclasses.replace(cfg, steps=2), tmp_path, progress=False).steps == 2


def test_extending_a_finished_run_continues_it(tmp_path):
    blocks = random_blocks(8)
    cfg = dataclasses.replace(BASE, steps=2)
    train(make_tiny_llama(), blocks, cfg, tmp_path, progress=False)
    again = train(make_tiny_llama(), blocks, cfg, tmp_path, progress=False)
    assert again.resumed_from == 2 and again.steps == 2 and again.final_loss is not None
    longer = train(make_tiny_llama(), blocks, dataclasses.replace(cfg, steps=3), tmp_path, progress=False)
    assert longer.resumed_from == 2 and [r["step"] for r in read_log(longer.log_path)] == [1, 2, 3]


def test_a_resumed_run_says_so(tmp_path, capsys):
    blocks = random_blocks(8)
    cfg = dataclasses.replace(BASE, steps=2)
    train(make_tiny_llama(), blocks, cfg, tmp_path, progress=False)
    assert "resumed" not in capsys.readouterr().err
    train(make_tiny_llama(), blocks, dataclasses.replace(cfg, steps=3), tmp_path, progress=False)
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"resumed from step 2 ({checkpoint_dir(tmp_path, 2)})"] and out == ""


def test_mixed_precision_can_change_between_runs_in_one_process(tmp_path):
    blocks = random_blocks(8)
    for i, mode in enumerate(["bf16", "no"]):
        cfg = dataclasses.replace(BASE, steps=1, mixed_precision=mode)
        result = train(make_tiny_llama(), blocks, cfg, tmp_path / str(i), progress=False)
        assert torch.isfinite(torch.tensor(result.final_loss))


def test_blocks_must_match_seq_len(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.seq_len"):
        train(make_tiny_llama(), random_blocks(8), dataclasses.replace(BASE, seq_len=8), tmp_path, progress=False)
