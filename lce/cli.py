"""The ``lce`` command: a Hydra app over ``lce.experiment.run``.

    lce experiment=quickstart
    lce -m posenc=rope,nope train.steps=200
    lce report outputs/quickstart outputs/other --out report/
    lce --version

Errors in the user's input (``LceError``) are printed as one line naming the bad value, without a traceback. The
configuration is checked (``lce.preflight``) before Hydra creates any directory and before torch is imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lce.errors import LceError


def fail(error: LceError) -> NoReturn:
    print(f"lce: error: {error}", file=sys.stderr)
    sys.exit(2)


def preflight(cfg: DictConfig) -> None:
    """``lce.preflight.check_config`` on the configuration without Hydra's own node; a failure ends the process."""
    from lce.preflight import check_config

    try:
        check_config(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]))
    except LceError as e:
        fail(e)


class Preflight(Callback):
    """Hydra callback (``conf/config.yaml``): check the configuration before Hydra creates the run or sweep directory
    (it would otherwise fail with a traceback on an ``out_root`` that is a file, or create ``run_name=a/b``)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        preflight(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        preflight(config)  # the swept values are checked again in each job, by app()


def _dirs() -> tuple[Path, Path]:
    """This job's directory, and the experiment's shared results directory (the sweep dir under multirun)."""
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    results_dir = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else out_dir.parent
    return out_dir, results_dir


@hydra.main(version_base="1.3", config_path="pkg://lce.conf", config_name="config")
def app(cfg: DictConfig) -> None:
    preflight(cfg)
    from lce.experiment import run
    from lce.train.zero3 import quiet_cpu_detection

    quiet_cpu_detection()  # deepspeed's import (by accelerate, whenever it is installed) would warn on every run

    out_dir, results_dir = _dirs()
    try:
        run(cfg, out_dir, results_dir)
    except LceError as e:
        fail(e)


def version_line() -> str:
    """``lce 0.1.0 (python ..., torch ..., transformers ..., ...)``: what ``lce --version`` prints."""
    from lce.provenance import versions

    found = versions()
    own = found.pop("lce") or "not installed"
    return f"lce {own} (" + ", ".join(f"{name} {version or 'not installed'}" for name, version in found.items()) + ")"


def quiet_cpu_threads() -> None:
    """Make torch's idle CPU threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``), unless the user chose.

    Read once, when torch loads OpenMP, so before torch is imported. Spinning threads fight any other process for the
    cores: beside one busy process, two spinning threads trained a 25M-parameter Llama at 0.65x the speed of one
    thread and two sleeping ones at 0.94x, for 8% of the second core's gain on an idle machine
    (experiments/results/threads/).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


#: Nodes that were plain values before they became config groups (``eval/protocol=yarn``,
#: ``eval/retrieval=[passkey,needle]``), each with the group override that makes sure the node exists for ``~`` to
#: delete (Hydra cannot delete a null, and ``eval.retrieval`` is null while no task is selected).
LEGACY_NODES = {"eval.protocol": [], "eval.retrieval": ["eval/retrieval=[passkey]"]}


def legacy_overrides(args: list[str]) -> list[str]:
    """``args`` with each ``eval.protocol={...}`` / ``eval.retrieval=[...]`` (the forms before these nodes were config
    groups) as ``~key +key=value``: Hydra would merge the value into the selected options, and refuse their keys,
    where the old form replaced the whole node (``lce.eval.config`` reads the value, a list with a deprecation
    warning)."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in LEGACY_NODES and value.lstrip().startswith(("{", "[")):
            out += [*LEGACY_NODES[key], f"~{key}", f"+{key}={value}"]
        else:
            out.append(arg)
    return out


def main() -> None:
    """``lce report ...`` merges result files (``lce.eval.compare``); ``lce --version`` prints the versions lce runs
    with; anything else is the Hydra app."""
    quiet_cpu_threads()
    if sys.argv[1:2] == ["report"]:
        from lce.eval.compare import main as report

        sys.exit(report(sys.argv[2:]))
    if sys.argv[1:] in (["--version"], ["-V"]):
        print(version_line())
        return
    sys.argv[1:] = legacy_overrides(sys.argv[1:])
    app()


if __name__ == "__main__":
    main()
