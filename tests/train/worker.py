"""One process of a multi-process run of tests/train/launched.py (started by ``accelerate launch``, not by pytest).

    accelerate launch --config_file conf/accelerate/cpu_ddp.yaml tests/train/worker.py OUT_DIR '{"run": {}}'

Writes the trained weights to ``OUT_DIR/final.safetensors`` from the main process, also when training stops on
non-finite steps (``"nan_from"``), which it reports on stderr before exiting with ``NONFINITE_EXIT``.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.conftest

from safetensors.torch import save_file

from lce.train import train
from lce.train.nonfinite import NonFiniteLossError
from tests.conftest import make_tiny_llama
from tests.train.launched import BLOCKS, NONFINITE_EXIT, poison, run_config


class KillAt:
    """A logger that makes the main process die when step ``step`` is logged."""

    def __init__(self, step: int | None):
        self.step = step

    def log_metrics(self, metrics, step):
        if step == self.step:
            raise SystemExit(f"killed at step {step}")


if __name__ == "__main__":
    out_dir, job = Path(sys.argv[1]), json.loads(sys.argv[2])
    model = make_tiny_llama()
    cfg = run_config(int(os.environ["WORLD_SIZE"]), **job["run"])
    val_blocks = BLOCKS[: job["val_blocks"]] if job.get("val_blocks") else None
    if job.get("nan_from"):
        poison(model, (job["nan_from"] - 1) * cfg.grad_accum + 1)  # one forward per micro-batch, no validation
    status = 0
    try:
        train(model, BLOCKS, cfg, out_dir, val_blocks=val_blocks, logger=KillAt(job["kill_at"]), progress=False)
    except NonFiniteLossError as e:
        print(f"NonFiniteLossError: {e}", file=sys.stderr)
        status = NONFINITE_EXIT
    if int(os.environ["RANK"]) == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
                  str(out_dir / "final.safetensors"))
    sys.exit(status)
