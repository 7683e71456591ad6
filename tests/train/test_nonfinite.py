"""Non-finite steps (lce.train.nonfinite): skipped without touching the weights, logged as valid JSON, never
checkpointed, and fatal after ``train.max_nonfinite_steps`` of them in a row."""

import dataclasses
import json
import math

import pytest
import torch

from lce.errors import LceError
from lce.train import TrainConfig, latest_checkpoint, train
from lce.train.checkpoint import checkpoint_dir, read_optimizer_state
from lce.train.nonfinite import NonFiniteGuard, NonFiniteLossError, json_record
from tests.conftest import make_tiny_llama
from tests.train.launched import poison, read_log

SEQ = 16
# One forward pass per step (grad_accum 1, no validation), so forward call k is step k.
BASE = TrainConfig(
    steps=8, seq_len=SEQ, micro_batch_size=2, lr=3e-3, warmup_steps=2, checkpoint_every=2, keep_checkpoints=1,
    log_every=1, val_every=0, loss_chunk_size=24, max_nonfinite_steps=2,
)
BLOCKS = torch.randint(2, 259, (8, SEQ + 1), generator=torch.Generator().manual_seed(0))


class Snapshots:
    """A logger that keeps a copy of the model's weights after every step (with ``log_every=1``)."""

    def __init__(self, model):
        self.model = model
        self.weights = {}

    def log_metrics(self, metrics, step):
        self.weights[step] = {name: value.clone() for name, value in self.model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


def checkpoints(run) -> list[str]:
    return sorted(path.name for path in (run / "checkpoints").iterdir())


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_training_stops_after_max_nonfinite_steps_in_a_row(tmp_path, limit):
    model = make_tiny_llama()
    poison(model, first_call=4)  # steps 4, 5, ... are NaN
    snapshots = Snapshots(model)
    cfg = dataclasses.replace(BASE, max_nonfinite_steps=limit)
    with pytest.raises(NonFiniteLossError) as info:
        train(model, BLOCKS, cfg, tmp_path, logger=snapshots, progress=False)

    stop = 3 + limit
    message = str(info.value)
    assert isinstance(info.value, LceError) and "\n" not in message  # the CLI prints it as one line
    assert message.startswith(f"train: step {stop}: loss nan, grad_norm nan: not finite for {limit} step(s) in a "
                              f"row (train.max_nonfinite_steps={limit}); the weights are those of the last finite "
                              "step;")
    assert message.endswith(f"; last good checkpoint: {checkpoint_dir(tmp_path, 2)}")
    log = read_log(tmp_path)  # strict JSON
    assert [r["step"] for r in log] == list(range(1, stop + 1))
    assert [r.get("nonfinite", False) for r in log] == [False] * 3 + [True] * limit
    assert all(r["loss"] is None and r["grad_norm"] is None and r["lr"] > 0 for r in log[3:])
    # Steps 4 on were skipped: the weights are step 3's, which differ from step 2's (the checkpoint's).
    assert_same_weights(model.state_dict(), snapshots.weights[3])
    assert not torch.equal(snapshots.weights[3]["model.norm.weight"], snapshots.weights[2]["model.norm.weight"])
    assert not model.training
    # Checkpoints fell due at step 4 (and 6) but those were not finite; keep_checkpoints=1 keeps the good one.
    assert checkpoints(tmp_path) == ["step_00000002"] and latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 2)


def test_nonfinite_from_the_first_step_names_no_checkpoint(tmp_path):
    model = make_tiny_llama()
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    poison(model, first_call=1)
    with pytest.raises(NonFiniteLossError, match=r"^train: step 2: loss nan.*; no checkpoint was saved before it$"):
        train(model, BLOCKS, BASE, tmp_path, progress=False)
    assert_same_weights(model.state_dict(), initial)
    assert latest_checkpoint(tmp_path) is None


def test_an_isolated_nonfinite_step_is_skipped_and_training_goes_on(tmp_path):
    model = make_tiny_llama()
    poison(model, first_call=3, last_call=3)
    snapshots = Snapshots(model)
    cfg = dataclasses.replace(BASE, steps=6, checkpoint_every=1, keep_checkpoints=10)
    result = train(model, BLOCKS, cfg, tmp_path, logger=snapshots, progress=False)

    log = read_log(tmp_path)
    assert [r["step"] for r in log] == list(range(1, 7)) and result.steps == 6
    assert [r.get("nonfinite", False) for r in log] == [False, False, True, False, False, False]
    assert log[2]["loss"] is None and all(math.isfinite(r["loss"]) for r in log if r is not log[2])
    assert result.final_loss == log[-1]["loss"]
    assert_same_weights(snapshots.weights[3], snapshots.weights[2])  # step 3 changed nothing
    assert not torch.equal(snapshots.weights[4]["model.norm.weight"], snapshots.weights[3]["model.norm.weight"])
    assert checkpoints(tmp_path) == [f"step_{s:08d}" for s in (1, 2, 4, 5, 6)]
    # AdamW stepped 5 times in 6 steps: the skipped step did not advance its state either.
    state = read_optimizer_state(checkpoint_dir(tmp_path, 6))["state"]
    assert state["model.norm.weight"]["step"].item() == 5


def test_a_run_ending_on_a_nonfinite_step_fails(tmp_path):
    model = make_tiny_llama()
    poison(model, first_call=6, last_call=6)
    cfg = dataclasses.replace(BASE, steps=6, checkpoint_every=1, keep_checkpoints=2, max_nonfinite_steps=3)
    with pytest.raises(NonFiniteLossError, match=r"^train: step 6: .* 1 step\(s\) in a row .*the run ended on them"):
        train(model, BLOCKS, cfg, tmp_path, progress=False)
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 5)


def test_json_record_writes_null_and_a_flag():
    finite = {"step": 1, "loss": 2.5, "grad_norm": 0.5}
    assert json_record(finite) is finite
    record = json_record({"step": 2, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3})
    assert record == {"step": 2, "loss": None, "grad_norm": None, "lr": 1e-3, "nonfinite": True}
    json.dumps(record, allow_nan=False)


def test_guard_does_not_count_fp16_overflow_steps():
    # The GradScaler skips an overflowing step and lowers its scale: a finite loss with an infinite norm is its own.
    guard = NonFiniteGuard(limit=2, last_checkpoint=None, loss_scaling=True)
    assert [guard.update(step, 2.0, math.inf, applied=False) for step in (1, 2, 3)] == [None] * 3
    assert guard.update(4, math.nan, math.inf, applied=False) is None
    error = guard.update(5, math.nan, math.inf, applied=False)
    assert str(error).startswith("train: step 5: loss nan, grad_norm inf: not finite for 2 step(s) in a row")


def test_guard_stops_at_once_when_a_nonfinite_update_was_applied(tmp_path):
    guard = NonFiniteGuard(limit=10, last_checkpoint=tmp_path / "step_00000004", loss_scaling=False)
    error = guard.update(5, math.nan, 1.0, applied=True)
    assert isinstance(error, NonFiniteLossError) and "DeepSpeed applied its update" in str(error)
    assert str(error).endswith(f"; last good checkpoint: {tmp_path / 'step_00000004'}")
