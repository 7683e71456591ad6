"""experiments/benchmarks/gpu.sh in its dry run (no GPU): the benchmark parts run end to end at toy sizes on CPU and
write their CSV/PNG into OUT_DIR, a part without budget left is skipped (not lost), the real-model part composes both
experiments for cuda, and an unknown part is refused with exit code 2."""

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "benchmarks" / "gpu.sh"


def run(tmp_path, *args):
    env = {**os.environ, "LCE_GPU_DRY_RUN": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args[:-1], str(tmp_path / "out"), *args[-1]], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)


def summary(tmp_path) -> dict[str, list[str]]:
    lines = (tmp_path / "out" / "summary.tsv").read_text().splitlines()[1:]
    return {line.split("\t")[0]: line.split("\t")[1:] for line in lines}


def test_benchmark_parts_write_checked_rows_for_every_case_and_mode(tmp_path):
    result = run(tmp_path, ["attention", "backward", "kernels"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(summary(tmp_path)[part][0] == "passed" for part in ("attention", "backward", "kernels"))
    out = tmp_path / "out"
    for stem in ("attention", "attention_bwd", "kernels"):
        assert (out / f"{stem}.png").stat().st_size > 10_000
    rows = [*csv.DictReader((out / "attention.csv").open()), *csv.DictReader((out / "attention_bwd.csv").open())]
    cases = {"causal", "alibi", "logn", "window", "sinks", "dca", "self_extend", "rerope"}
    status = {(r["case"], r["mode"], r["impl"]): r["value"] for r in rows if r["metric"] == "status"}
    for case in cases:
        for mode in ("fwd", "fwd+bwd"):
            assert status[(case, mode, "lce_triton")] == "ok"
            assert any(r["metric"] == "tflops" and (r["case"], r["mode"]) == (case, mode) for r in rows)
            assert any(r["metric"] == "err_out" and (r["case"], r["mode"], r["impl"]) == (case, mode, "lce_triton")
                       for r in rows)  # checked at the benchmarked size
    assert status[("causal", "fwd", "flex")].startswith("unavailable")  # the dry run skips FlexAttention
    errors = [r for r in rows
              if r["metric"].startswith("err_") and r["impl"] == "lce_triton" and r["mode"] == "fwd+bwd"]
    assert {r["metric"] for r in errors} == {"err_out", "err_q", "err_k", "err_v"}
    assert all(float(r["value"]) < 1e-4 for r in errors)
    assert {r["backend"] for r in rows if r["impl"] == "sdpa_flash" and r["metric"] == "ms"} == {
        "sdpa:FLASH_ATTENTION", "sdpa:FLASH_ATTENTION on scaled queries"}
    ops = list(csv.DictReader((out / "kernels.csv").open()))
    ops_status = {(r["case"], r["mode"], r["impl"]): r["value"] for r in ops if r["metric"] == "status"}
    assert all(ops_status[(case, mode, "lce_triton")] == "ok" for case in ("rope", "linear", "loss")
               for mode in ("fwd", "fwd+bwd"))
    assert ops_status[("loss", "fwd", "liger_flce")].startswith("unavailable")
    assert any(r["metric"] == "gb_per_s" and r["case"] == "rope" for r in ops)


def test_a_part_without_budget_left_is_skipped_and_recorded(tmp_path):
    result = run(tmp_path, "--budget", "25", ["smoke"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert summary(tmp_path)["smoke"][0] == "skipped (budget)"


def test_real_part_composes_both_experiments_for_cuda(tmp_path):
    result = run(tmp_path, ["real"])
    assert result.returncode == 0, result.stdout + result.stderr
    log = (tmp_path / "out" / "logs" / "real.log").read_text()
    assert "experiment=real_extrapolation device=cuda composes" in log
    assert "experiment=real_retrieval device=cuda composes" in log
    assert summary(tmp_path)["real"][:2] == ["passed", "0"]


def test_unknown_part_is_refused(tmp_path):
    result = run(tmp_path, ["bogus"])
    assert result.returncode == 2 and "unknown part 'bogus'" in result.stderr
