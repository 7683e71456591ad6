"""experiments/benchmarks/sparse_cpu.py at a toy length (no FlexAttention: it compiles for minutes on a CPU): every
case writes its harness rows, lce's paths agree with the op on the same selection, ratios against SDPA are written,
and an implementation predicted to run too long is recorded as skipped."""

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"))

import sparse_cpu


def test_sparse_cpu_benchmark_writes_checked_rows_and_ratios(tmp_path):
    out = tmp_path / "bench"
    code = sparse_cpu.main(["--out", str(out), "--lengths", "256", "--no-flex", "--warmup", "0", "--repeats", "1"])
    assert code == 0
    rows = list(csv.DictReader((out / sparse_cpu.CSV_NAME).open()))
    assert {"date", "device", "threads", "torch", "dtype", "heads", "kv_heads", "head_dim", "case", "mode", "impl",
            "length", "metric", "value", "backend"} <= set(rows[0])
    status = {(r["case"], r["impl"], int(r["length"])): r["value"] for r in rows if r["metric"] == "status"}
    for length in (256,):
        assert status[("causal", "sdpa", length)] == "ok"
        assert status[("causal", "flex", length)].startswith("unavailable")
        for case in ("moba", "topk_blocks", "nsa"):
            assert status[(case, "lce", length)] == "ok"
            assert status[(case, "lce_op", length)].startswith("ok")
    errs = [float(r["value"]) for r in rows if r["metric"] == "err_out" and r["impl"] == "lce_op"]
    assert errs and max(errs) < 1e-5  # moba and topk_blocks: the op on the layer's own selection
    assert {r["metric"] for r in rows} >= {"ms", "peak_mib", "tokens_per_s"}
    ratios = list(csv.DictReader((out / "ratios.csv").open()))
    sdpa = [r for r in ratios if (r["case"], r["impl"]) == ("causal", "sdpa")]
    assert sdpa and all(float(r["time_vs_sdpa"]) == 1.0 for r in sdpa)
    assert (out / "sparse_cpu.png").stat().st_size > 5_000


def test_slow_implementations_are_skipped_and_recorded():
    assert sparse_cpu.predicted_seconds([], 256) is None
    assert sparse_cpu.predicted_seconds([(128, 1000.0)], 256) == 4.0  # T^2 before two points
    assert abs(sparse_cpu.predicted_seconds([(64, 500.0), (128, 1000.0)], 256) - 2.0) < 1e-6  # measured: linear


def test_a_length_predicted_too_slow_is_recorded_as_skipped(tmp_path):
    out = tmp_path / "bench"
    code = sparse_cpu.main(["--out", str(out), "--lengths", "64", "128", "--cases", "causal", "--no-flex",
                            "--warmup", "0", "--repeats", "1", "--max-seconds", "1e-9"])
    assert code == 0
    rows = list(csv.DictReader((out / sparse_cpu.CSV_NAME).open()))
    status = {(r["impl"], int(r["length"])): r["value"] for r in rows if r["metric"] == "status"}
    assert status[("sdpa", 64)] == "ok"
    assert status[("sdpa", 128)].startswith("unavailable: skipped: predicted")
