"""Table, CSV and plots of sweep rows: OOM and non-finite points, points written twice; the files of the report."""

import csv
import io
import json
import sys

import matplotlib
import pytest
from matplotlib.figure import Figure
from PIL import Image

from lce.errors import ConfigError
from lce.eval.compare import markdown, ppl_csv, write_report
from lce.eval.report import format_length, format_ppl, pivot, plot, plot_position_nll


def make_row(run, length, ppl, status="ok", **extra):
    return {
        "run": run, "method": run.split("_")[0], "params": {"factor": 4, "beta_fast": 32}, "model": "tiny",
        "length": length, "seed": 0, "protocol": {"name": "canonical"}, "status": status, "ppl": ppl,
        "nll": None if ppl is None else 1.5,
        "tokens": None if ppl is None else 254, "tokens_per_s": None if ppl is None else 1000.5,
        "peak_mem_mb": 12.25, **extra,
    }


ROWS = [
    make_row("rope", 128, 9.87654),
    make_row("rope", 256, 123.456),
    make_row("rope", 512, None, status="oom", error="CUDA out of memory"),
    make_row("yarn_s4", 128, 10.5),
    make_row("yarn_s4", 256, 9.25),
]


def test_pivot():
    labels, lengths, table = pivot(ROWS)
    assert labels == ["rope", "yarn_s4"] and lengths == [128, 256, 512]
    assert table["rope"] == {128: 9.87654, 256: 123.456, 512: "oom"}
    assert 512 not in table["yarn_s4"]


def test_pivot_rejects_two_points_for_one_series_and_length():
    with pytest.raises(ConfigError, match="two different points for run 'rope' at length 128"):
        pivot(ROWS + [make_row("rope", 128, 1.0, seed=1)])


def test_a_point_written_twice_counts_once_first_row_first():
    """The sweep's rule (``lce.eval.sweep.first_finished``): an older lce could write a point twice."""
    rows = ROWS + [make_row("rope", 128, 1.0)]
    assert pivot(rows)[2]["rope"][128] == 9.87654
    assert pivot([make_row("rope", 128, 1.0, status="running"), *ROWS])[2]["rope"][128] == 9.87654


def test_table():
    text = markdown(ROWS)
    for line in ("| rope | **9.877** | 123.46 | OOM |", "| yarn_s4 | 10.50 | **9.250** | - |", "OOM: out of memory"):
        assert line in text
    assert "non-finite" not in text


@pytest.mark.parametrize(
    "ppl, text",
    [(3.14159, "3.142"), (31.4159, "31.42"), (314.159, "314.16"), (2.5e5, "2.500e+05"), (float("inf"), "inf")],
)
def test_format_ppl(ppl, text):
    assert format_ppl(ppl) == text


def test_format_length():
    assert [format_length(n) for n in (96, 1024, 1536, 32768, 2**20)] == ["96", "1k", "1536", "32k", "1M"]


def test_csv():
    params = '"{""beta_fast"": 32, ""factor"": 4}"'
    lines = ppl_csv(ROWS[:3]).splitlines()
    # A single run's columns first, as the end of a sweep has always written them; then lce report's.
    assert lines[0] == ("run,method,params,model,length,status,ppl,nll,tokens,tokens_per_s,peak_mem_mb,seed,series,"
                        "experiment,protocol,aggregation,ppl_low,ppl_high,mem_kind,seconds")
    tail = "rope,,canonical,token_mean,,,,"  # series, experiment, protocol, aggregation, no interval, memory or time
    assert lines[1:] == [f"rope,rope,{params},tiny,128,ok,9.87654,1.5,254,1000.5,12.25,0,{tail}",
                         f"rope,rope,{params},tiny,256,ok,123.456,1.5,254,1000.5,12.25,0,{tail}",
                         f"rope,rope,{params},tiny,512,oom,,,,,12.25,0,{tail}"]
    assert json.loads(next(csv.DictReader(io.StringIO(ppl_csv(ROWS))))["params"]) == {"beta_fast": 32, "factor": 4}


def test_plot_writes_a_png(tmp_path):
    path = plot(ROWS, tmp_path / "plot.png", train_length=128, title="tiny")
    assert path.stat().st_size > 10_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert 800 <= image.width <= 2000 and 500 <= image.height <= 1200


def test_plot_leaves_pyplot_alone(tmp_path):
    backend = matplotlib.get_backend()
    plot(ROWS, tmp_path / "plot.png")
    assert matplotlib.get_backend() == backend
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_write_report(tmp_path):
    paths = write_report(ROWS, tmp_path / "out", train_length=256)
    assert {key: path.name for key, path in paths.items()} == {
        "md": "report.md", "ppl_csv": "ppl_vs_length.csv", "ppl_png": "ppl_vs_length.png",
        "position_png": "nll_vs_position.png"}
    assert all(p.exists() and p.parent == tmp_path / "out" for p in paths.values())
    assert paths["ppl_csv"].read_text() == ppl_csv(ROWS) and paths["md"].read_text() == markdown(ROWS) + "\n"


def test_structured_cells_are_json():
    row = {**ROWS[0], "model": {"name": "tiny_llama", "hidden_size": 64}}
    assert json.loads(next(csv.DictReader(io.StringIO(ppl_csv([row]))))["model"]) == {"name": "tiny_llama",
                                                                                      "hidden_size": 64}


NONFINITE_ROWS = [
    make_row("rope", 128, 9.5, bucket_size=64, bucket_nll=[2.0, 2.5]),
    make_row("rope", 256, None, status="nonfinite", bucket_size=64, bucket_nll=[None] * 4,
             error="non-finite result: nll=nan, ppl=nan"),
    make_row("rope", 512, None, status="oom"),
    make_row("broken", 128, None, status="nonfinite", bucket_size=64, bucket_nll=[None, None]),
    make_row("broken", 256, None, status="nonfinite", bucket_size=64, bucket_nll=[None] * 4),
]


@pytest.fixture
def figures(monkeypatch):
    """The figures the plots save (drawn, not only written), for their legends and lines."""
    saved, savefig = [], Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return saved


def legend_and_lines(fig):
    ax = fig.axes[0]
    return [t.get_text() for t in ax.get_legend().get_texts()], {line.get_label(): line for line in ax.get_lines()}


def test_nonfinite_points_in_table_and_csv(tmp_path):
    assert pivot(NONFINITE_ROWS)[2] == {"rope": {128: 9.5, 256: "nonfinite", 512: "oom"},
                                        "broken": {128: "nonfinite", 256: "nonfinite"}}
    text = markdown(NONFINITE_ROWS)
    assert "| rope | 9.500 | non-finite | OOM |" in text and "| broken | non-finite | non-finite | - |" in text
    assert "OOM: out of memory; non-finite: NaN or infinite loss, no perplexity" in text
    lines = [r for r in csv.DictReader(io.StringIO(ppl_csv(NONFINITE_ROWS))) if r["run"] == "rope"]
    assert [(r["length"], r["status"], r["ppl"]) for r in lines[:2]] == [("128", "ok", "9.5"), ("256", "nonfinite", "")]


def test_plots_leave_nonfinite_points_out_and_say_so(tmp_path, figures):
    plot(NONFINITE_ROWS, tmp_path / "ppl.png")
    names, lines = legend_and_lines(figures[-1])
    assert "rope (non-finite loss at 256: not plotted)" in names and "out of memory" in names
    assert "broken (non-finite loss at 128, 256: not plotted)" in names
    assert list(lines["rope (non-finite loss at 256: not plotted)"].get_xdata()) == [128]
    assert list(lines["broken (non-finite loss at 128, 256: not plotted)"].get_xdata()) == []

    plot_position_nll(NONFINITE_ROWS, tmp_path / "position.png", train_length=128)
    names, lines = legend_and_lines(figures[-1])
    assert names[:2] == ["rope (L=128) (non-finite loss at 256: not plotted)",
                         "broken (non-finite loss at 128, 256: not plotted)"]
    assert list(lines[names[0]].get_ydata()) == [2.0, 2.5] and list(lines[names[1]].get_ydata()) == []


def test_write_report_with_nonfinite_points(tmp_path):
    paths = write_report(NONFINITE_ROWS, tmp_path / "out")
    for key in ("ppl_png", "position_png"):
        assert paths[key].read_bytes()[:4] == b"\x89PNG"
