"""The resumable sweep: resume, a kill at any moment, OOM as a result, order independence, point identity."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lce.errors import ConfigError, LceError
from lce.eval import sweep
from lce.eval.sweep import ResultStore, point_key, run_sweep
from tests.conftest import make_tiny_llama

REPO_ROOT = Path(__file__).resolve().parents[2]
LENGTHS = [32, 48, 64]
META = {
    "run": "rope", "method": "rope", "params": {"theta": 10000.0}, "model": "tiny-llama", "seed": 0,
    "protocol": {"n_docs": 2, "split": "test", "doc_policy": "truncate", "bucket_size": 16}, "train_length": 32,
}
# The killed sweep runs in another process, whose kernels may round differently (thread count).
RTOL = 1e-6


def make_docs():
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 259, (n,), generator=generator) for n in (64, 70)]


def sweep_inputs():
    """Model, documents, lengths and meta shared by this module and the subprocess it kills."""
    return make_tiny_llama(), make_docs(), LENGTHS, META


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """Rows of one uninterrupted sweep, by length."""
    path = tmp_path_factory.mktemp("reference") / "rows.jsonl"
    rows = run_sweep(model, make_docs(), LENGTHS, path, meta=META, bucket_size=16, progress=False)
    return {row["length"]: row for row in rows}


def sweep_into(model, path, lengths=LENGTHS, meta=META):
    return run_sweep(model, make_docs(), lengths, path, meta=meta, bucket_size=16, progress=False)


def assert_same_points(rows, reference):
    assert [row["length"] for row in rows] == sorted(reference)
    for row in rows:
        expected = reference[row["length"]]
        assert row["status"] == "ok"
        assert row["ppl"] == pytest.approx(expected["ppl"], rel=RTOL)
        assert row["bucket_nll"] == pytest.approx(expected["bucket_nll"], rel=RTOL)


def test_row_schema(reference):
    row = reference[48]
    assert {k: row[k] for k in META} == META
    assert row["status"] == "ok" and row["tokens"] == 2 * 47
    assert row["bucket_size"] == 16 and row["bucket_tokens"] == [32, 32, 30]
    assert row["nll"] == pytest.approx(
        sum(m * n for m, n in zip(row["bucket_nll"], row["bucket_tokens"])) / row["tokens"], rel=1e-12
    )
    assert row["mem_kind"] == "cpu_rss_delta" and row["peak_mem_mb"] >= 0
    assert row["seconds"] > 0 and row["tokens_per_s"] > 0 and row["time"].endswith("+00:00")


def test_rerun_skips_finished_points(model, tmp_path):
    path = tmp_path / "rows.jsonl"
    first = sweep_into(model, path)
    lines = path.read_text().splitlines()
    assert sweep_into(model, path) == first
    assert path.read_text().splitlines() == lines
    assert [row["length"] for row in first] == LENGTHS


def test_returns_earlier_rows_of_the_same_identity(model, tmp_path, reference):
    path = tmp_path / "rows.jsonl"
    sweep_into(model, path, lengths=[64, 32])
    assert_same_points(sweep_into(model, path, lengths=[48]), reference)


def test_resume_after_sigkill(model, tmp_path, reference):
    path = tmp_path / "rows.jsonl"
    script = (
        "import sys, time\n"
        "import lce.eval.sweep as sweep\n"
        "from tests.eval.test_sweep import sweep_inputs\n"
        "model, docs, lengths, meta = sweep_inputs()\n"
        "score, calls = sweep.CanonicalProtocol.score, []\n"
        "def slow_after_first(*args, **kwargs):\n"
        "    calls.append(None)\n"
        "    if len(calls) > 1:\n"
        "        time.sleep(120)\n"
        "    return score(*args, **kwargs)\n"
        "sweep.CanonicalProtocol.score = slow_after_first\n"
        "sweep.run_sweep(model, docs, lengths, sys.argv[1], meta=meta, bucket_size=16, progress=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (path.exists() and path.read_bytes().endswith(b"\n")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the sweep subprocess wrote no row in time"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert len(path.read_text().splitlines()) == 1

    rows = sweep_into(model, path)
    assert_same_points(rows, reference)
    assert sorted(row["length"] for row in ResultStore(path).rows()) == LENGTHS


def test_truncated_last_line_is_skipped_and_recomputed(model, tmp_path, reference):
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps(reference[length]) for length in LENGTHS]
    path.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][: len(lines[2]) // 2])
    with pytest.warns(UserWarning, match=r"rows\.jsonl:3: ignoring a truncated"):
        rows = sweep_into(model, path)
    assert_same_points(rows, reference)
    assert [row["length"] for row in ResultStore(path).rows()] == LENGTHS


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(LceError, match=r"rows\.jsonl:2"):
        ResultStore(path).rows()


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail"),
     RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory\nmore detail")],
    ids=["cuda_oom", "cpu_oom"],
)
def test_out_of_memory_is_recorded_and_the_sweep_goes_on(model, tmp_path, monkeypatch, reference, error):
    score = sweep.CanonicalProtocol.score

    def fail_at_48(protocol, nll_fn, docs, length, **kwargs):
        if length == 48:
            raise error
        return score(protocol, nll_fn, docs, length, **kwargs)

    monkeypatch.setattr(sweep.CanonicalProtocol, "score", fail_at_48)
    path = tmp_path / "rows.jsonl"
    rows = {row["length"]: row for row in sweep_into(model, path)}
    oom = rows[48]
    assert oom["status"] == "oom" and oom["ppl"] is None and oom["nll"] is None
    assert oom["error"] == str(error).splitlines()[0]
    assert_same_points([rows[32], rows[64]], {k: reference[k] for k in (32, 64)})
    # An OOM point is finished: a rerun does not retry it.
    monkeypatch.setattr(sweep.CanonicalProtocol, "score", score)
    assert sweep_into(model, path)[1]["status"] == "oom"


def test_other_errors_propagate_and_write_nothing(model, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(sweep.CanonicalProtocol, "score", broken)
    path = tmp_path / "rows.jsonl"
    with pytest.raises(ValueError, match="a bug"):
        sweep_into(model, path)
    assert ResultStore(path).rows() == []


def test_order_of_lengths_does_not_change_results(model, tmp_path):
    shuffled = sweep_into(model, tmp_path / "a.jsonl", lengths=[64, 32, 48])
    ordered = sweep_into(model, tmp_path / "b.jsonl", lengths=[32, 48, 64])
    assert [row["ppl"] for row in shuffled] == [row["ppl"] for row in ordered]
    assert [row["bucket_nll"] for row in shuffled] == [row["bucket_nll"] for row in ordered]


def test_params_are_part_of_the_identity(model, tmp_path):
    path = tmp_path / "rows.jsonl"
    sweep_into(model, path, lengths=[32])
    other = {**META, "params": {"theta": 500.0}}
    rows = sweep_into(model, path, lengths=[32], meta=other)
    assert len(rows) == 1 and rows[0]["params"] == {"theta": 500.0}
    assert len(ResultStore(path).rows()) == 2


def test_point_key_is_canonical():
    row = {**META, "length": 32}
    reordered = {**dict(reversed(list(row.items()))), "params": {"theta": 10000.0}}
    assert point_key(reordered) == point_key(row)
    assert point_key({**row, "train_length": 64, "git": "abc"}) == point_key(row)
    assert point_key({**row, "protocol": {**META["protocol"], "n_docs": 3}}) != point_key(row)
    with pytest.raises(ConfigError, match="seed"):
        point_key({k: v for k, v in row.items() if k != "seed"})


def test_lengths_beyond_the_documents_fail_before_scoring(model, tmp_path):
    path = tmp_path / "rows.jsonl"
    with pytest.raises(ConfigError, match=r"\[65\].*docs\[0\].*64 tokens"):
        sweep_into(model, path, lengths=[32, 65])
    assert not path.exists()


def test_meta_must_hold_the_identity_fields(model, tmp_path):
    with pytest.raises(ConfigError, match="method"):
        sweep_into(model, tmp_path / "rows.jsonl", meta={k: v for k, v in META.items() if k != "method"})


def test_meta_may_not_shadow_measured_fields(model, tmp_path):
    with pytest.raises(ConfigError, match="status"):
        sweep_into(model, tmp_path / "rows.jsonl", meta={**META, "status": "draft"})


def test_append_waits_for_the_lock_of_another_writer(tmp_path):
    """Parallel jobs share one store: a writer waits while another holds the lock (flock conflicts between two open
    file descriptions, also within one process)."""
    store = ResultStore(tmp_path / "rows.jsonl")
    writer = threading.Thread(target=store.append, args=({"run": "b"},))
    with store._locked(exclusive=True):
        store.path.write_text('{"run": "a"}\n{"run": "a", "half')  # a row in progress, under the lock
        writer.start()
        writer.join(timeout=0.5)
        assert writer.is_alive(), "the second writer did not wait for the lock"
        store.path.write_text('{"run": "a"}\n{"run": "a", "half": 1}\n')
    writer.join(timeout=10)
    assert [row["run"] for row in store.rows()] == ["a", "a", "b"]
