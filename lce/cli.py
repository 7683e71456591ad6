"""The ``lce`` command: a Hydra app over ``lce.experiment.run``.

    lce experiment=quickstart
    lce -m posenc=rope,nope train.steps=200
    lce report outputs/quickstart outputs/other --out report/

Errors in the user's input (``LceError``) are printed as one line naming the bad value, without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lce.errors import LceError


def _dirs() -> tuple[Path, Path]:
    """This job's directory, and the experiment's shared results directory (the sweep dir under multirun)."""
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    results_dir = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else out_dir.parent
    return out_dir, results_dir


@hydra.main(version_base="1.3", config_path="pkg://lce.conf", config_name="config")
def app(cfg: DictConfig) -> None:
    from lce.experiment import run

    out_dir, results_dir = _dirs()
    try:
        run(cfg, out_dir, results_dir)
    except LceError as e:
        print(f"lce: error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """``lce report ...`` merges result files (``lce.eval.compare``); anything else is the Hydra app."""
    if sys.argv[1:2] == ["report"]:
        from lce.eval.compare import main as report

        sys.exit(report(sys.argv[2:]))
    app()


if __name__ == "__main__":
    main()
