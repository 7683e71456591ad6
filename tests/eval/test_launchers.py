"""Hydra launchers (``conf/hydra/launcher``): ``slurm`` and ``local`` extend hydra-submitit-launcher's typed configs,
and a multirun with ``local`` runs each job in a process of its own."""

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

import lce.conf
from lce.eval.sweep import ResultStore
from lce.experiment import parse_run_config

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = Path(lce.conf.__file__).parent / "hydra" / "launcher"
PLUGIN = "hydra_plugins.hydra_submitit_launcher.submitit_launcher"


def composed(overrides):
    with initialize_config_module(config_module="lce.conf", version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("name,target", [("slurm", f"{PLUGIN}.SlurmLauncher"), ("local", f"{PLUGIN}.LocalLauncher")])
def test_launcher_composes_over_the_plugin_schema(name, target):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Hydra's deprecated automatic schema matching
        cfg = composed([f"hydra/launcher={name}", "hydra.launcher.timeout_min=30"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == target
    own = OmegaConf.to_container(OmegaConf.load(LAUNCHERS / f"{name}.yaml"))
    values = OmegaConf.to_container(launcher)
    for key in own.keys() - {"defaults"}:
        assert values[key] == (30 if key == "timeout_min" else own[key]), key
    # The launcher does not reach lce's own configuration.
    assert parse_run_config({k: v for k, v in cfg.items() if k != "hydra"}).task == "train_eval"


def test_slurm_keeps_the_plugin_fields_and_types():
    launcher = composed(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.qos=high"])
    assert launcher.hydra.launcher.partition == "gpu" and launcher.hydra.launcher.qos == "high"
    assert {"account", "constraint", "setup", "additional_parameters"} <= set(launcher.hydra.launcher)
    with pytest.raises(ConfigCompositionException, match="timeout_min=soon") as error:
        composed(["hydra/launcher=slurm", "hydra.launcher.timeout_min=soon"])
    assert isinstance(error.value.__cause__, ValidationError)  # typed by the plugin's SlurmQueueConf


def test_local_multirun_runs_each_job_in_its_own_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "lce.cli", "-m", "hydra/launcher=local", "task=eval", "posenc=rope,nope",
               "eval.lengths=[16]", "eval.n_docs=1", "eval.batch_size=1", f"out_root={tmp_path}",
               "experiment_name=launch"]
    done = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sweep_dir = tmp_path / "launch"
    assert sorted(row["run"] for row in ResultStore(sweep_dir / "results.jsonl").rows()) == ["nope-full", "rope-full"]
    # submitit's local job id is the pid of the process that ran the job: two jobs, two processes, neither this one.
    jobs = [p for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]
    assert len({p.name for p in jobs}) == 2 and str(os.getpid()) not in {p.name for p in jobs}
    for job in jobs:
        status, _ = pickle.loads(next(job.glob("*_result.pkl")).read_bytes())
        assert status == "success"
