"""Loggers: wandb never prompts or blocks without a key, and receives metrics and the sweep."""

import json
import sys
import types

import pytest

from lce.loggers import LOGGERS, WandbLogger, wandb_key_available

ROWS = [
    {"run": "rope", "method": "rope", "length": 128, "status": "ok", "ppl": 8.8, "nll": 2.17, "tokens": 100,
     "tokens_per_s": 1.0, "peak_mem_mb": 1.0},
    {"run": "rope", "method": "rope", "length": 256, "status": "oom", "ppl": None, "nll": None, "tokens": None,
     "tokens_per_s": None, "peak_mem_mb": None},
]


@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "missing-netrc"))
    assert not wandb_key_available()


@pytest.mark.timeout(120)
def test_online_without_key_falls_back_to_offline(no_wandb_key, tmp_path):
    with pytest.warns(UserWarning, match="no wandb API key"):
        run = WandbLogger(mode="online").start({"seed": 0}, "test-run", tmp_path)
    try:
        assert run.run.settings.mode == "offline"
        run.log_metrics({"train/loss": 1.5}, step=1)
        run.log_sweep(ROWS, None)
    finally:
        run.finish()
    tables = list(tmp_path.glob("wandb/offline-run-*/files/media/table/ppl_vs_length_*.table.json"))
    table = json.loads(next(t for t in tables if "plot" not in t.name).read_text())
    assert table["columns"][:3] == ["run", "method", "length"] and len(table["data"]) == 2
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb")), "the offline run file holds the metrics"


def test_none_logger_writes_nothing_and_accepts_every_row(tmp_path, monkeypatch):
    """``logger=none`` never raises, returns nothing, writes no file (not into its out_dir, not into the working
    directory) and never reaches wandb, whatever the rows hold: OOM rows, non-finite numbers, missing fields."""
    monkeypatch.chdir(tmp_path)
    touched = []

    class Untouchable(types.ModuleType):
        def __getattr__(self, name):
            touched.append(name)
            raise AssertionError(f"the none logger used wandb.{name}")

    monkeypatch.setitem(sys.modules, "wandb", Untouchable("wandb"))
    modules_before = set(sys.modules)
    rows = [*ROWS,
            {"run": "rope", "method": "rope", "length": 512, "status": "ok", "ppl": float("inf"), "nll": float("nan"),
             "tokens": 0, "tokens_per_s": float("nan"), "peak_mem_mb": None},
            {"run": "nope", "length": 1024, "status": "error"},
            {}]
    plot = tmp_path / "missing.png"

    run = LOGGERS.build("none").start({"seed": 0, "nested": {"a": [1, 2]}}, "x", tmp_path / "out")
    results = [run.log_metrics({"a": 1.0, "b": float("nan"), "c": float("-inf")}, step=0),
               run.log_metrics({}, step=None),
               run.log_sweep(rows, None), run.log_sweep(rows, plot), run.log_sweep([], None),
               run.finish(), run.finish()]

    assert results == [None] * len(results)
    assert list(tmp_path.rglob("*")) == [], "the none logger wrote files"
    assert touched == [] and not {m for m in set(sys.modules) - modules_before if m.split(".")[0] == "wandb"}
