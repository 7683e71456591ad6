"""The resumable sweep: resume, a kill at any moment, OOM and non-finite losses as results, order independence,
point identity, concurrent runs into one file, duplicated points, unwritable stores."""

import json
import math
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
from lce.eval import compare, sweep
from lce.eval.protocols import ProtocolScore
from lce.eval.sweep import ResultStore, first_finished, point_key, run_sweep
from tests.conftest import make_tiny_llama
from tests.eval.concurrent_run import launch_pair

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


def assert_strict_json(path):
    """Every line of ``path`` is JSON without NaN or Infinity (which ``json.loads`` accepts by default)."""
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda constant: pytest.fail(f"{constant} in {path.name}"))


def never_score(*args, **kwargs):
    pytest.fail("scored a point that was already finished")


def test_two_concurrent_sweeps_write_each_point_once(tmp_path, reference):
    """Both processes read the store, then both compute every point before either appends it (see
    ``concurrent_run.py``): the store keeps the first append of each point, and both return those rows."""
    path = tmp_path / "rows.jsonl"
    a, b = launch_pair("sweep", path)
    stored = ResultStore(path).rows()
    assert sorted(row["length"] for row in stored) == LENGTHS
    assert a == b == sorted(stored, key=lambda row: row["length"])
    assert_same_points(a, reference)


def test_append_unless_done_keeps_the_first_finished_row(tmp_path):
    store = ResultStore(tmp_path / "rows.jsonl")
    row = {**META, "length": 32, "status": "ok", "ppl": 1.0}
    assert store.append_unless_done(row, point_key) == row
    assert store.append_unless_done({**row, "ppl": 2.0}, point_key) == row
    assert store.append_unless_done({**row, "seed": 1, "ppl": 3.0}, point_key)["ppl"] == 3.0
    assert [r["ppl"] for r in store.rows()] == [1.0, 3.0]


def test_finished_reads_only_new_rows_and_survives_repairs_and_replacement(tmp_path):
    path = tmp_path / "rows.jsonl"
    reader, writer = ResultStore(path), ResultStore(path)
    row = {**META, "length": 32, "status": "ok", "ppl": 1.0}
    writer.append(row)
    assert list(reader.finished(point_key).values()) == [row]
    writer.append({**row, "ppl": 2.0})
    writer.append({**row, "length": 48})
    assert [(r["length"], r["ppl"]) for r in reader.finished(point_key).values()] == [(32, 1.0), (48, 1.0)]
    # A half-written row is not read until the next writer repairs the tail; then the row written over it is.
    path.write_bytes(path.read_bytes() + b'{"run": "ro')
    with pytest.warns(UserWarning, match=r"rows\.jsonl:4: ignoring a truncated"):
        assert len(reader.finished(point_key)) == 2
    writer.append({**row, "length": 64})
    assert [r["length"] for r in reader.finished(point_key).values()] == [32, 48, 64]
    # A file replaced by another is read from its start.
    replacement = tmp_path / "new.jsonl"
    replacement.write_text(json.dumps({**row, "ppl": 3.0}) + "\n")
    os.replace(replacement, path)
    assert [r["ppl"] for r in reader.finished(point_key).values()] == [3.0]


def test_first_finished_rule():
    row = {**META, "length": 32, "status": "ok", "ppl": 1.0}
    rows = [{**row, "status": "running"}, row, {**row, "ppl": 2.0}, {**row, "length": 48, "status": "nonfinite"}]
    assert list(first_finished(rows).values()) == [row, rows[3]]


def test_a_point_written_twice_is_used_once_by_sweep_report_and_compare(model, tmp_path, monkeypatch, reference):
    """A file from an older lce holds a point twice (different values, to see which one is used): the sweep
    resumes without recomputing, and the sweep, its report and ``lce report`` all use the first row."""
    path = tmp_path / "results.jsonl"
    first, second = {**reference[48], "ppl": 111.0}, {**reference[48], "ppl": 222.0}
    path.write_text("".join(json.dumps(row) + "\n" for row in (reference[32], first, second, reference[64])))
    monkeypatch.setattr(sweep.CanonicalProtocol, "score", never_score)
    rows = sweep_into(model, path)
    assert [row["ppl"] for row in rows] == [reference[32]["ppl"], 111.0, reference[64]["ppl"]]
    assert len(ResultStore(path).rows()) == 4  # nothing appended

    paths = compare.write_report(ResultStore(path).rows(), tmp_path / "out")
    assert "111.00" in paths["md"].read_text() and "222" not in paths["md"].read_text()
    csv_lines = paths["ppl_csv"].read_text().splitlines()[1:]
    assert [line.split(",")[4] for line in csv_lines] == ["32", "48", "64"]
    assert ",111.0," in csv_lines[1]

    loaded = compare.load_rows([path])
    assert [row["ppl"] for row in loaded if row["length"] == 48] == [111.0]
    assert "111.00" in compare.markdown(loaded) and "222" not in compare.markdown(ResultStore(path).rows())


def test_nonfinite_loss_is_a_finished_point_written_as_valid_json(tmp_path, monkeypatch):
    model = make_tiny_llama(rope_theta=-1.0)  # a broken config: negative base, NaN rotation angles, NaN loss
    path = tmp_path / "rows.jsonl"
    rows = sweep_into(model, path)
    assert [row["status"] for row in rows] == ["nonfinite"] * len(LENGTHS)
    row = rows[0]
    assert row["ppl"] is None and row["nll"] is None and row["token_nll"] is None
    assert row["bucket_nll"] == [None, None] and row["bucket_tokens"] == [32, 30] and row["tokens"] == 2 * 31
    assert row["error"] == "non-finite result: nll=nan, ppl=nan" and row["tokens_per_s"] > 0
    assert_strict_json(path)
    # Finished, like an OOM: a rerun does not compute it again.
    monkeypatch.setattr(sweep.CanonicalProtocol, "score", never_score)
    assert sweep_into(model, path) == rows


def test_where_a_score_stops_being_finite(model, tmp_path, monkeypatch):
    """ok with a finite ppl; a bootstrap bound that overflows is null (unbounded), not a reason to drop the point;
    an overflowing ppl (nll >= 709 nats) keeps its finite nll; NaN nulls everything non-finite."""
    def fake_score(protocol, nll_fn, docs, length, **kwargs):
        nll = {32: 1.0, 48: 750.0, 64: math.nan}[length]
        return ProtocolScore(protocol="canonical", aggregation="token_mean", nll=nll, nll_sum=10 * nll, tokens=10,
                             windows=2, bucket_size=16, bucket_nll=[5 * nll, 5 * nll], bucket_tokens=[5, 5],
                             ppl_low=2.0, ppl_high=math.inf, confidence=0.95)

    monkeypatch.setattr(sweep.CanonicalProtocol, "score", fake_score)
    path = tmp_path / "rows.jsonl"
    ok, overflow, nan = sweep_into(model, path)
    assert (ok["status"], ok["ppl"], ok["ppl_low"], ok["ppl_high"]) == ("ok", math.e, 2.0, None)
    assert (overflow["status"], overflow["nll"], overflow["ppl"]) == ("nonfinite", 750.0, None)
    assert overflow["bucket_nll"] == [750.0, 750.0] and overflow["error"] == "non-finite result: ppl=inf"
    assert (nan["status"], nan["nll"], nan["ppl"], nan["bucket_nll"]) == ("nonfinite", None, None, [None, None])
    assert_strict_json(path)


def test_rows_of_an_older_lce_with_nan_are_read_as_nonfinite(model, tmp_path, monkeypatch, reference):
    path = tmp_path / "results.jsonl"
    nan = math.nan
    old = {**reference[48], "ppl": nan, "nll": nan, "token_nll": nan, "bucket_nll": [nan, nan, nan]}
    path.write_text(json.dumps(reference[32]) + "\n" + json.dumps(old) + "\n")  # json.dumps writes NaN, as lce did
    stored = ResultStore(path).rows()
    assert stored[0] == reference[32]
    assert stored[1]["status"] == "nonfinite" and stored[1]["ppl"] is None and stored[1]["bucket_nll"] == [None] * 3
    monkeypatch.setattr(sweep.CanonicalProtocol, "score", never_score)
    assert [row["status"] for row in sweep_into(model, path, lengths=[32, 48])] == ["ok", "nonfinite"]
    compare.write_report(stored, tmp_path / "out")


def test_the_store_never_writes_nan_or_infinity(tmp_path):
    store = ResultStore(tmp_path / "rows.jsonl")
    store.append({"run": "a"})
    for bad in ({"run": "b", "ppl": math.nan}, {"run": "b", "bucket_nll": [1.0, math.inf]},
                {"run": "b", "params": {"factor": -math.inf}}):
        with pytest.raises(ValueError, match=r"field\(s\) (ppl|bucket_nll|params) hold NaN or infinity"):
            store.append(bad)
    with pytest.raises(ValueError, match="NaN or infinity"):
        store.append_unless_done({**META, "length": 32, "status": "ok", "ppl": math.nan}, point_key)
    assert store.rows() == [{"run": "a"}]


def test_meta_must_be_finite(model, tmp_path):
    with pytest.raises(ConfigError, match=r"meta: field\(s\) params hold NaN"):
        sweep_into(model, tmp_path / "rows.jsonl", meta={**META, "params": {"theta": math.nan}})


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    return path


@pytest.mark.parametrize("where", ["in_file", "under_file", "is_directory"])
def test_an_unwritable_store_fails_before_scoring(model, tmp_path, monkeypatch, a_file, where):
    """Checked for root too: a path under a regular file cannot be created by anyone."""
    path, reason = {
        "in_file": (a_file / "rows.jsonl", f"{a_file} is a file, not a directory"),
        "under_file": (a_file / "sub" / "rows.jsonl",
                       f"{a_file} is a file, not a directory, so {a_file / 'sub'} cannot be created in it"),
        "is_directory": (tmp_path / "rows.jsonl", f"{tmp_path / 'rows.jsonl'} is a directory"),
    }[where]
    if where == "is_directory":
        path.mkdir()
    monkeypatch.setattr(sweep.CanonicalProtocol, "score", never_score)
    with pytest.raises(LceError) as error:
        sweep_into(model, path)
    assert str(error.value) == f"cannot write results to {path}: {reason}"


@pytest.fixture
def read_only_dir(tmp_path):
    directory = tmp_path / "committed"
    directory.mkdir()
    (directory / "rows.jsonl").write_text("")
    (directory / "rows.jsonl").chmod(0o444)
    directory.chmod(0o555)
    try:
        if os.access(directory, os.W_OK):
            pytest.skip("chmod does not stop this user (root) from writing")
        yield directory
    finally:
        directory.chmod(0o755)


def test_a_read_only_directory_is_reported_in_one_line(read_only_dir):
    new = read_only_dir / "new" / "rows.jsonl"
    other = read_only_dir / "other.jsonl"
    cases = [
        (ResultStore(new), f"{read_only_dir} is not writable, so {new.parent} cannot be created in it"),
        (ResultStore(other), f"the directory {read_only_dir} is not writable (Permission denied)"),
    ]
    for store, reason in cases:
        with pytest.raises(LceError) as error:
            store.check_writable()
        assert str(error.value) == f"cannot write results to {store.path}: {reason}"
    # A lock file that exists, in a read-only directory, over a read-only results file.
    read_only_dir.chmod(0o755)
    (read_only_dir / "rows.jsonl.lock").write_text("")
    read_only_dir.chmod(0o555)
    with pytest.raises(LceError, match=r"rows\.jsonl is not writable \(Permission denied\)$"):
        ResultStore(read_only_dir / "rows.jsonl").check_writable()
