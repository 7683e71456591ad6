"""The ``lce`` command end to end: a tiny multirun through Hydra, resume, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

TINY = [
    "experiment_name=e2e", "train.steps=4", "train.micro_batch_size=2", "train.seq_len=32", "train.val_every=2",
    "train.val_batches=1", "train.checkpoint_every=2", "model.hidden_size=32", "model.num_hidden_layers=1",
    "eval.lengths=[32,64,96]", "eval.n_docs=2", "eval.batch_size=2",
]


def lce(out_root, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "lce.cli", *args, f"out_root={out_root}"]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def multirun(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cli")
    result = lce(tmp_path, "-m", "posenc=rope,nope", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path, result


def test_multirun_trains_sweeps_and_reports(multirun):
    tmp_path, result = multirun
    out = tmp_path / "e2e"
    points = rows(out / "results.jsonl")
    assert sorted((p["run"], p["length"]) for p in points) == sorted(
        (run, length) for run in ("rope-full", "nope-full") for length in (32, 64, 96)
    )
    assert all(p["status"] == "ok" and p["ppl"] > 1 and p["train_length"] == 32 for p in points)
    assert {p["method"] for p in points} == {"rope", "nope"}
    for run in ("rope-full", "nope-full"):
        assert (out / run / "model" / "model.safetensors").is_file()
        log = rows(out / run / "train_log.jsonl")
        assert [entry["step"] for entry in log] == [1, 2, 3, 4]
    csv = (out / "ppl_vs_length.csv").read_text().splitlines()
    assert csv[0].startswith("run,method,params,model,length,status,ppl") and len(csv) == 7
    assert (out / "ppl_vs_length.png").stat().st_size > 10_000
    assert "nope-full" in result.stdout and "rope-full" in result.stdout  # the terminal table


def test_rerun_resumes_and_adds_nothing(multirun):
    tmp_path, _ = multirun
    before = (tmp_path / "e2e" / "results.jsonl").read_text()
    result = lce(tmp_path, "posenc=nope", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "e2e" / "results.jsonl").read_text() == before


def test_trained_model_reloads_for_evaluation(multirun):
    """A saved run evaluates as ``model=hf``: its NoPE patch comes back from config.lce, same perplexity."""
    tmp_path, _ = multirun
    trained = tmp_path / "e2e" / "nope-full" / "model"
    result = lce(tmp_path, "task=eval", "model=hf", f"model.path={trained}", "posenc=nope", "run_name=reloaded",
                 *[a for a in TINY if not a.startswith(("model.", "train.steps"))])
    assert result.returncode == 0, result.stderr[-3000:]
    points = {(p["run"], p["length"]): p["ppl"] for p in rows(tmp_path / "e2e" / "results.jsonl")}
    for length in (32, 64, 96):
        assert points[("reloaded", length)] == pytest.approx(points[("nope-full", length)], rel=1e-6)


def test_changed_config_in_an_existing_run_dir_is_refused(multirun):
    tmp_path, _ = multirun
    result = lce(tmp_path, "posenc=nope", *TINY, "train.lr=0.5")
    assert result.returncode == 2
    assert "already holds run 'nope-full' with a different train configuration" in result.stderr


@pytest.mark.parametrize(
    "override,message",
    [
        ("+posenc.facter=2", "lce: error: posenc.facter: unknown key; allowed keys: logn, logn_length, name"),
        ("train.lr=fast", "lce: error: train.lr: expected a number, got 'fast'"),
        ("eval.n_docs=0", "lce: error: eval.n_docs: must be >= 1, got 0"),
        ("backend=trition", ("lce: error: backend='trition' is not a backend; choose one of auto, ref, triton "
                             "(did you mean 'triton'?)")),
        ("train.seq_len=0", "lce: error: train.seq_len: must be >= 1, got 0"),  # not max_position_embeddings
        ("eval.posencs=[{name: yarn, factor: 0.5}]", "lce: error: eval.posencs[0].factor: must be a finite number"),
        ("run_name=a/b", "lce: error: run_name: 'a/b' must be a single directory name"),
        ("+sead=1", "lce: error: sead: unknown key (did you mean 'seed'?)"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, override, message):
    result = lce(tmp_path, override)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_an_out_root_that_is_a_file_is_one_line_before_any_directory_is_made(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for multirun in ([], ["-m"]):
        result = lce(blocker, *multirun, "posenc=rope,nope" if multirun else "posenc=rope")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert f"lce: error: out_root: {blocker} is a file, not a directory" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused_before_any_work(tmp_path):
    """It trained the whole run on the CPU, then failed in the sweep with a traceback."""
    result = lce(tmp_path, "device=cuda", "experiment_name=nodevice")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "lce: error: device: 'cuda' but CUDA is not available" in result.stderr
    assert not list((tmp_path / "nodevice").rglob("train_log.jsonl"))


def test_version_names_what_lce_runs_with():
    result = subprocess.run([sys.executable, "-m", "lce.cli", "--version"], capture_output=True, text=True,
                            timeout=60, check=True)
    line = result.stdout.strip()
    assert line.startswith("lce 0.1.0 (python ") and "torch " in line and "transformers " in line
    assert "accelerate " in line and "triton " in line and "peft " in line


def test_unknown_group_option_lists_choices(tmp_path):
    result = lce(tmp_path, "posenc=yarnn")
    assert result.returncode != 0
    assert "Could not find 'posenc/yarnn'" in result.stderr and "nope" in result.stderr


def test_training_free_methods_are_series_of_one_model(multirun):
    """``eval.posencs`` evaluates one trained model under several patches; RoPE reproduces the trained run."""
    tmp_path, _ = multirun
    trained = tmp_path / "e2e" / "rope-full" / "model"
    result = lce(tmp_path, "task=eval", "model=hf", f"model.path={trained}", "run_name=training-free",
                 "eval.posencs=[{name: rope},{name: logn, logn_length: 16, label: my-logn}]",
                 *[a for a in TINY if not a.startswith(("model.", "train.steps"))])
    assert result.returncode == 0, result.stderr[-3000:]
    points = {(p["run"], p["length"]): p for p in rows(tmp_path / "e2e" / "results.jsonl")}
    for length in (32, 64, 96):
        assert points[("rope", length)]["ppl"] == pytest.approx(points[("rope-full", length)]["ppl"], rel=1e-6)
        assert points[("my-logn", length)]["method"] == "logn"
        assert points[("my-logn", length)]["params"]["posenc"] == {"name": "logn", "logn_length": 16}
    assert points[("my-logn", 96)]["ppl"] != points[("rope", 96)]["ppl"]


def test_protocol_retrieval_and_report(multirun):
    """Another protocol, a passkey grid and ``lce report`` over the experiment, through the CLI."""
    tmp_path, _ = multirun
    trained = tmp_path / "e2e" / "nope-full" / "model"
    result = lce(tmp_path, "task=eval", "model=hf", f"model.path={trained}", "posenc=nope", "run_name=sliding",
                 "eval.protocol={name: sliding, stride: 16}",
                 "eval.retrieval=[{name: passkey, lengths: [320], depths: [0.0, 1.0], trials: 1, key_digits: 2}]",
                 *[a for a in TINY if not a.startswith(("model.", "train.steps", "eval.n_docs"))], "eval.n_docs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    points = [p for p in rows(tmp_path / "e2e" / "results.jsonl") if p["run"] == "sliding"]
    assert {p["protocol"]["name"] for p in points} == {"sliding"} and len(points) == 3
    trials = rows(tmp_path / "e2e" / "retrieval.jsonl")
    assert sorted(t["depth"] for t in trials) == [0.0, 1.0] and all(t["status"] == "ok" for t in trials)
    assert (tmp_path / "e2e" / "retrieval_sliding_passkey.png").stat().st_size > 5_000

    report = subprocess.run([sys.executable, "-m", "lce.cli", "report", str(tmp_path / "e2e"), "--out",
                             str(tmp_path / "report")], check=False, capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "sliding" in text and "rope-full" in text
    # One report pipeline: the end of the last sweep wrote the same files into the experiment's directory.
    for path in (tmp_path / "report").iterdir():
        assert path.suffix == ".png" or path.read_text() == (tmp_path / "e2e" / path.name).read_text(), path.name
        assert (tmp_path / "e2e" / path.name).is_file()


@pytest.mark.parametrize("chosen,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_idle_cpu_threads_sleep_unless_the_user_chose(chosen, expected):
    """``lce`` sets OMP_WAIT_POLICY before torch (and OpenMP) is loaded (experiments/results/threads/)."""
    script = ("import os, sys\nsys.argv = ['lce', '--version']\nimport lce.cli\nlce.cli.main()\n"
              "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if chosen:
        env["OMP_WAIT_POLICY"] = chosen
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60,
                          check=True)
    assert done.stdout.strip().splitlines()[-1] == f"{expected} False"
