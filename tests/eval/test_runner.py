"""The point runner both evaluations share: out-of-memory as a result, resume, the first row kept, one series'
rows; and the result type and report pieces they share."""

import math
import warnings

import pytest
import torch

from lce.errors import ConfigError
from lce.eval.report import RUN_CLASH, best_per_length, csv_text, series_table
from lce.eval.runner import PointRunner, measure
from lce.eval.score import ProtocolScore
from lce.eval.shard import Shard, run_on_main
from lce.eval.store import ResultStore, point_key

SERIES = {"run": "a", "method": "rope", "params": {}, "model": "tiny", "seed": 0, "protocol": {"name": "x"}}


def test_measure_returns_out_of_memory_and_raises_bugs():
    ok = measure(lambda: 42, "cpu")
    assert (ok.value, ok.error, ok.mem_kind) == (42, None, "cpu_rss_delta") and ok.seconds >= 0

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB\nmore")

    failed = measure(oom, "cpu")
    assert failed.value is None and failed.error == "CUDA out of memory. Tried to allocate 1 GiB"
    with pytest.raises(ValueError, match="a bug"):
        measure(lambda: (_ for _ in ()).throw(ValueError("a bug")), "cpu")


def test_runner_resumes_keeps_the_first_row_and_returns_one_series(tmp_path):
    store = ResultStore(tmp_path / "rows.jsonl")
    runner = PointRunner(store, point_key, Shard())
    first = runner.record({**SERIES, "length": 64}, {"status": "ok", "ppl": 2.0})
    runner.record({**SERIES, "run": "b", "length": 32}, {"status": "ok", "ppl": 3.0})
    runner.record({**SERIES, "length": 32}, {"status": "ok", "nll": math.nan, "ppl": math.nan})
    # Another run of the same points: it finds them finished, and a point it records anyway keeps the first row.
    again = PointRunner(store, point_key, Shard())
    assert again.finished({**SERIES, "length": 64}) == first
    assert again.record({**SERIES, "length": 64}, {"status": "ok", "ppl": 9.0}) == first
    rows = again.series_rows(SERIES, order=lambda row: row["length"])
    assert [(row["length"], row["status"], row["ppl"]) for row in rows] == [(32, "nonfinite", None), (64, "ok", 2.0)]


def test_run_on_main_in_one_process():
    assert run_on_main(Shard(), lambda: [1, 2], "work") == [1, 2]


def test_one_score_type_takes_the_former_point_score_arguments():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from lce.eval.perplexity import PointScore
    assert PointScore is ProtocolScore and caught[0].category is DeprecationWarning
    score = ProtocolScore(13.0, 7, 3, [6.0, 6.0, 1.0], [3, 3, 1])
    assert score.nll == pytest.approx(13 / 7) and score.aggregation == "token_mean" and score.protocol == "canonical"


def test_series_table_and_csv_text_serve_both_reports():
    rows = [{"run": "a", "length": 64, "status": "ok", "ppl": 3.0},
            {"run": "b", "length": 64, "status": "ok", "ppl": 2.0},
            {"run": "a", "length": 32, "status": "oom", "ppl": None}]
    labels, lengths, table = series_table(rows, lambda row: row["run"])
    assert labels == ["a", "b"] and lengths == [32, 64] and table["a"][32]["status"] == "oom"
    assert best_per_length(table, lengths) == {32: None, 64: 2.0}
    with pytest.raises(ConfigError, match="two different points for run 'a' at length 64"):
        series_table(rows + rows[:1], lambda row: row["run"], RUN_CLASH)
    assert csv_text(("run", "ppl", "params"), [{"run": "a", "ppl": None, "params": {"b": 1}}]) == (
        'run,ppl,params\na,,"{""b"": 1}"\n')
