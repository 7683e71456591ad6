"""Hydra launchers (``conf/hydra/launcher``): ``slurm`` and ``local`` extend hydra-submitit-launcher's typed configs,
and a multirun with ``local`` runs each job in a process of its own."""

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
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


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (``timeout``'s default signal, a CI runner's stop) raises KeyboardInterrupt inside the block, as Ctrl-C
    does, so ``finally`` clauses run instead of the process dying on the spot."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _kill_session(process: subprocess.Popen, grace_s: float = 1.0) -> None:
    """SIGTERM to every process in ``process``'s group (it leads one: ``start_new_session``), then SIGKILL to the group
    unless it emptied within ``grace_s`` (submitit's workers carry on after SIGTERM). ``process`` itself is reaped on
    the way; killed orphans may stay zombies until init reaps them, which is why nothing waits after SIGKILL."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return  # the group is empty
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        process.poll()
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)


def run_in_own_session(command: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True)`` for a command whose workers outlive it: submitit's
    local launcher starts a controller and a worker process per job, and killing only the direct child (what
    ``subprocess.run`` does on a timeout or Ctrl-C) leaves them running. The command gets a session (and so a process
    group) of its own, and the whole group is killed however the call ends: done, timed out, Ctrl-C or SIGTERM."""
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, **kwargs)
    try:
        with _sigterm_interrupts():
            stdout, stderr = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    finally:
        _kill_session(process)
        process.stdout.close()
        process.stderr.close()


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
    done = run_in_own_session(command, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sweep_dir = tmp_path / "launch"
    assert sorted(row["run"] for row in ResultStore(sweep_dir / "results.jsonl").rows()) == ["nope-full", "rope-full"]
    # submitit's local job id is the pid of the process that ran the job: two jobs, two processes, neither this one.
    jobs = [p for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]
    assert len({p.name for p in jobs}) == 2 and str(os.getpid()) not in {p.name for p in jobs}
    for job in jobs:
        status, _ = pickle.loads(next(job.glob("*_result.pkl")).read_bytes())
        assert status == "success"
