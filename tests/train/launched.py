"""Runs of ``lce.train.train`` in several processes under ``accelerate launch`` (tests/train/worker.py), and the one-
process runs they are compared with: the same blocks and the same global batch, split over the processes."""

import dataclasses
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from lce.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = ROOT / "conf" / "accelerate"
BLOCKS = torch.randint(2, 259, (16, 17), generator=torch.Generator().manual_seed(0))


# The sharded-training tests (test_fsdp.py, test_zero3.py): 2 micro-batches per process and step, so gradients
# accumulate across micro-batches while sharded; 0.5 is below every step's gradient norm in these runs (asserted), so
# clipping scales every update; validation (a forward without backward) runs just before each checkpoint.
SHARDED_RUN = {"global_micro_batches": 4, "grad_clip": 0.5, "checkpoint_every": 2, "val_every": 2}
VAL_BLOCKS = 4
# Non-finite steps under sharding: forward passes give NaN from step NAN_FROM on (no validation, which would count as
# forward passes), so steps 4 and 5 are skipped and training stops after step 5 with checkpoint 2 the last good one.
NAN_FROM = 4
NONFINITE_RUN = {**SHARDED_RUN, "val_every": 0, "steps": 6, "max_nonfinite_steps": 2}
NONFINITE_EXIT = 3  # a worker's exit status when training stopped on non-finite steps


def one_process_reference(run: Path):
    """The one-process run the sharded ones are compared with: 4 micro-batches per step; returns the trained model."""
    from lce.train import train
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    train(model, BLOCKS, run_config(1, **SHARDED_RUN), run, val_blocks=BLOCKS[:VAL_BLOCKS], progress=False)
    return model


def nonfinite_reference(run: Path) -> torch.nn.Module:
    """The one-process run of ``NONFINITE_RUN`` with NaN from step ``NAN_FROM``; returns its model, which holds the
    weights of the last finite step when training stops."""
    from lce.train import train
    from lce.train.nonfinite import NonFiniteLossError
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    cfg = run_config(1, **NONFINITE_RUN)
    poison(model, (NAN_FROM - 1) * cfg.grad_accum + 1)
    try:
        train(model, BLOCKS, cfg, run, progress=False)
    except NonFiniteLossError as e:
        assert str(e).startswith("train: step 5: loss nan, grad_norm nan: not finite for 2 step(s) in a row"), e
        return model
    raise AssertionError("the one-process run did not stop on its non-finite steps")


def assert_nonfinite_run_matches_one_process(config: str, tmp_path: Path, grad_norm: str) -> None:
    """A launched run of ``NONFINITE_RUN`` with NaN from step ``NAN_FROM``: it stops after 2 non-finite steps with
    checkpoint 2 the last good one, logs what one process logs (strict JSON), and leaves step 3's weights.

    Args:
        config: the accelerate launch config (``cpu_fsdp2``, ``cpu_deepspeed_zero3``).
        grad_norm: how the launch reports the non-finite steps' gradient norm in the error (``nan``; DeepSpeed
            skips such a step itself and reports ``inf``).
    """
    import re

    import pytest

    from lce.train import latest_checkpoint
    from lce.train.checkpoint import checkpoint_dir

    run = tmp_path / config
    done = launch(config, run, nan_from=NAN_FROM, **NONFINITE_RUN)
    assert done.returncode != 0
    stopped = (rf"NonFiniteLossError: train: step 5: loss nan, grad_norm {grad_norm}: not finite for 2 step\(s\) in "
               r"a row .*; last good checkpoint: .*step_00000002\n")
    assert re.search(stopped, done.stderr), done.stderr[-3000:]
    assert latest_checkpoint(run) == checkpoint_dir(run, 2)
    model = nonfinite_reference(tmp_path / "one")
    launched, reference = read_log(run), read_log(tmp_path / "one")
    assert [r.get("nonfinite", False) for r in launched] == [r.get("nonfinite", False) for r in reference]
    assert [r.get("nonfinite", False) for r in reference] == [False] * 3 + [True] * 2
    # As in the tests that the sharded runs match one process.
    assert [r["loss"] for r in launched[:3]] == pytest.approx([r["loss"] for r in reference[:3]], rel=1e-6)
    for name, value in final_weights(run).items():  # step 3's, gathered when training stopped: as in one process
        torch.testing.assert_close(value, model.state_dict()[name], atol=1e-5, rtol=0, msg=name)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """The weights a launched run saved when it finished (tests/train/worker.py)."""
    from safetensors.torch import load_file

    return load_file(run / "final.safetensors")


def run_config(num_processes: int, global_micro_batches: int = 2, **overrides) -> TrainConfig:
    """``global_micro_batches`` micro-batches of 2 blocks per optimizer step, split over ``num_processes``."""
    base = TrainConfig(steps=4, seq_len=16, micro_batch_size=2, grad_accum=global_micro_batches // num_processes,
                       lr=3e-3, warmup_steps=1, val_every=0, log_every=1, checkpoint_every=4, loss_chunk_size=24,
                       seed=0)
    return dataclasses.replace(base, **overrides)


def launch(config: str | Path, out_dir: Path, *, kill_at: int | None = None, val_blocks: int = 0,
           nan_from: int | None = None, **run_kwargs) -> subprocess.CompletedProcess:
    """Train in the processes of ``conf/accelerate/{config}.yaml`` (or of the config file ``config``, a Path);
    ``run_kwargs`` go to ``run_config``; the first ``val_blocks`` blocks are the validation blocks.

    With ``kill_at`` the main process dies when step ``kill_at`` is logged (before its checkpoint) and torchrun stops
    the others, like a killed job; the run then exits non-zero. With ``nan_from`` the model's forward passes give NaN
    from that step on (``poison``); when training stops on them, the workers save the model's weights and exit with
    ``NONFINITE_EXIT``. Otherwise a failed run raises with its output.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = {"kill_at": kill_at, "val_blocks": val_blocks, "nan_from": nan_from, "run": run_kwargs}
    config_file = config if isinstance(config, Path) else ACCELERATE / f"{config}.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
         "--main_process_port", str(port), str(ROOT / "tests" / "train" / "worker.py"), str(out_dir),
         json.dumps(job)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=300, capture_output=True, text=True, check=False,
    )
    if kill_at is None and nan_from is None and done.returncode != 0:
        raise AssertionError(f"launch failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def read_log(run: Path) -> list[dict]:
    """The JSONL step log of ``run``, read as strict JSON (NaN and Infinity, which ``json.dumps`` writes, fail)."""
    return [json.loads(line, parse_constant=_not_json) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def poison(model: torch.nn.Module, first_call: int, last_call: int | None = None) -> None:
    """Make the forward passes of ``model`` numbered ``first_call`` to ``last_call`` (counted from 1; None: all
    later ones) compute NaN, loss and gradients alike: the input embeddings' output becomes NaN."""
    calls = itertools.count(1)

    def hook(module, args, output):
        call = next(calls)
        return output + float("nan") if first_call <= call <= (last_call or call) else None

    model.get_input_embeddings().register_forward_hook(hook)


def losses(run: Path) -> list[float]:
    return [record["loss"] for record in read_log(run)]
