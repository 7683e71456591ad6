"""experiments/benchmarks/harness.py: every implementation is checked against the reference (output and gradients)
before it is timed, a wrong one is reported mismatched, and one that cannot run (absent, out of memory, raising)
gets a status row while the others are still measured."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"))
from harness import Impl, Timing, Unavailable, failures, lookup, measure, ratio_rows


def impls():
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    inputs = {"x": x}

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    def broken():
        raise ValueError("a bug")

    return {
        "reference": Impl(lambda: x.exp(), inputs, "torch"),
        "lce_triton": Impl(lambda: x.exp() * (1 + 1e-6), inputs, "triton"),
        "wrong": Impl(lambda: x.exp() + x, inputs, "torch"),
        "detached": Impl(lambda: x.detach().exp() + 0 * x, inputs, compare_grads=False),
        "absent": Unavailable("not installed"),
        "oom": Impl(oom, inputs),
        "broken": Impl(broken, inputs),
    }


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_measure_checks_then_times_and_records_what_cannot_run(mode):
    points = measure("toy", mode, 8, impls(), "reference", torch.device("cpu"), Timing(warmup=0, repeats=2),
                     flops=1e6, tokens=8)
    status = {impl: value for (_, _, impl, _), value in lookup(points, "status").items()}
    assert status["reference"] == "ok" and status["lce_triton"] == "ok"
    assert status["wrong"].startswith("mismatch: err_out")
    assert status["detached"] == "ok"  # its output matches; its (zero) gradient is not compared by design
    assert status["absent"] == "unavailable: not installed"
    assert status["oom"] == "oom" and status["broken"] == "error: ValueError: a bug"
    errors = {(impl, p_metric): v for p_metric in ("err_out", "err_x")
              for (_, _, impl, _), v in lookup(points, p_metric).items()}
    assert errors[("lce_triton", "err_out")] < 1e-5
    assert (("lce_triton", "err_x") in errors) == (mode == "fwd+bwd")
    assert ("detached", "err_x") not in errors
    ms = lookup(points, "ms")
    assert {impl for (_, _, impl, _) in ms} == {"reference", "lce_triton", "wrong", "detached"}
    assert all(p.mode == mode for p in points)
    assert {metric for metric in ("ms_p20", "ms_p80", "tflops", "tokens_per_s", "peak_mib")
            if lookup(points, metric)} == {"ms_p20", "ms_p80", "tflops", "tokens_per_s", "peak_mib"}
    assert {peer for _, _, _, peer, _ in ratio_rows(points)} == {"reference", "wrong", "detached"}
    assert failures(points) == []
    assert next(p.value for p in failures(points, subjects=("wrong",))).startswith("mismatch")
