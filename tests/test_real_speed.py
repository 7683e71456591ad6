"""experiments/benchmarks/real_speed.py end to end on a tiny local model: one CSV row per (impl, length, metric), every
part of the time split measured and none counted twice, and the plot written."""

import csv
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "benchmarks" / "real_speed.py"


def test_speed_benchmark_writes_its_csv_and_plot(tmp_path):
    model_dir = tmp_path / "tiny"
    make_tiny_llama(max_position_embeddings=2048).save_pretrained(model_dir)  # the methods are set for an 8k model
    out = tmp_path / "speed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model_dir), "--lengths", "64", "96",
                             "--methods", "rope", "dca", "self_extend", "--threads", "1", "--repeats", "2",
                             "--out", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = list(csv.DictReader((out / "speed.csv").open()))
    impls = {"transformers", "lce rope", "lce dca", "lce self_extend"}
    assert {(r["impl"], int(r["length"])) for r in rows} == {(i, n) for i in impls for n in (64, 96)}
    for impl in impls:
        value = {r["metric"]: float(r["value"]) for r in rows if r["impl"] == impl and r["length"] == "96"}
        # "other" is the remainder: negative only if the hooks double-counted (nested modules, a hook left behind).
        assert value["attention_ms"] > 0 and value["mlp_ms"] > 0 and value["loss_ms"] > 0
        assert 0 <= value["other_ms"] < value["ms"]
    assert (out / "speed.png").stat().st_size > 10_000
    assert "time / plain transformers" in result.stdout
