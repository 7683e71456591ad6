"""Runs of ``lce.train.train`` in several processes under ``accelerate launch`` (tests/train/worker.py), and the one-
process runs they are compared with: the same blocks and the same global batch, split over the processes."""

import dataclasses
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


def one_process_reference(run: Path):
    """The one-process run the sharded ones are compared with: 4 micro-batches per step; returns the trained model."""
    from lce.train import train
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    train(model, BLOCKS, run_config(1, **SHARDED_RUN), run, val_blocks=BLOCKS[:VAL_BLOCKS], progress=False)
    return model


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
           **run_kwargs) -> subprocess.CompletedProcess:
    """Train in the processes of ``conf/accelerate/{config}.yaml`` (or of the config file ``config``, a Path);
    ``run_kwargs`` go to ``run_config``; the first ``val_blocks`` blocks are the validation blocks.

    With ``kill_at`` the main process dies when step ``kill_at`` is logged (before its checkpoint) and torchrun stops
    the others, like a killed job; the run then exits non-zero. Otherwise a failed run raises with its output.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = {"kill_at": kill_at, "val_blocks": val_blocks, "run": run_kwargs}
    config_file = config if isinstance(config, Path) else ACCELERATE / f"{config}.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
         "--main_process_port", str(port), str(ROOT / "tests" / "train" / "worker.py"), str(out_dir),
         json.dumps(job)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=300, capture_output=True, text=True, check=False,
    )
    if kill_at is None and done.returncode != 0:
        raise AssertionError(f"launch failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [record["loss"] for record in read_log(run)]
