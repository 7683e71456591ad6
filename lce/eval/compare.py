"""``lce report``: merge result files of any set of runs into one comparison (markdown or CSV) and plots; the same
report, by the same code (``write_report``), is what the end of a sweep writes into its results directory.

    lce report outputs/ multirun/2025-01-01/ --out report/
    lce report a/results.jsonl b/results.jsonl --format csv --run 'rope*' --experiment quickstart

Inputs are ``results.jsonl`` / ``retrieval.jsonl`` / ``harness.jsonl`` files or directories searched recursively for
them. Rows are deduplicated by experiment and identity (``lce.eval.store.point_key``, plus depth and trial for
retrieval rows, the task for harness rows, ``lce.eval.harness``) by the
store's own rule (``lce.eval.store.first_finished``: the first finished row wins), so a file given twice, or both
directly and through its directory, or a point a file holds twice, counts once. A series is an (experiment, run,
protocol) triple, labelled by the parts that differ between the selected rows. Perplexities whose protocol does not
average token-weighted (``yarn``, ``longlora_stream``: see ``lce.eval.protocols``) are marked with a dagger.

Output: the report on stdout; with ``--out DIR`` also the files of ``write_report`` (``report.md``,
``ppl_vs_length.csv``, ``ppl_vs_length.png``, ``nll_vs_position.png``, ``retrieval.csv`` and one
``retrieval_<series>_<task>.png`` heatmap per series and task with depths), whose paths are printed after it. With
RULER tasks (``lce.eval.retrieval.ruler``) the markdown adds RULER's average per series and length, and with
harness rows one table of lm-eval metrics per task and series (``harness_markdown``). The title
is the rows' experiment when they hold one. The output depends only on the rows, never on file order, paths or the time.
``--wandb`` logs the tables and plots to Weights & Biases: offline unless an API key is configured (``WANDB_MODE`` is
respected), never prompting.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import os
import sys
from pathlib import Path

from lce.errors import ConfigError, LceError
from lce.eval.harness import KIND as HARNESS_KIND
from lce.eval.harness import harness_key
from lce.eval.heatmap import slug, write_heatmaps  # noqa: F401 - slug: callers import it from here
from lce.eval.protocols import TOKEN_MEAN
from lce.eval.report import (
    STATUS_NOTES,
    STATUS_TEXT,
    best_per_length,
    csv_text,
    format_ppl,
    plot,
    plot_position_nll,
    print_outputs,
    series_table,
)
from lce.eval.retrieval import KIND, cell_accuracy, retrieval_key
from lce.eval.store import NONFINITE, OK, OOM, ResultStore, first_finished, point_key

RESULT_FILES = ("results.jsonl", "retrieval.jsonl", "harness.jsonl")
# The columns a single run's table always had come first, so that readers of its columns by position keep working.
PPL_COLUMNS = (
    "run", "method", "params", "model", "length", "status", "ppl", "nll", "tokens", "tokens_per_s", "peak_mem_mb",
    "seed", "series", "experiment", "protocol", "aggregation", "ppl_low", "ppl_high", "mem_kind", "seconds",
)
RETRIEVAL_COLUMNS = ("series", "task", "length", "depth", "trials", "correct", "accuracy", "status")
RULER_PREFIX = "ruler_"  # the retrieval tasks whose accuracies RULER's average takes (lce.eval.retrieval.ruler)


def find_result_files(paths: list[str | Path]) -> list[Path]:
    """Result files named by ``paths``: files as given, directories searched recursively for ``RESULT_FILES``."""
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if path.is_dir():
            for name in RESULT_FILES:
                for file in sorted(path.rglob(name)):
                    found.setdefault(file.resolve())
        elif path.is_file():
            found.setdefault(path.resolve())
        else:
            raise ConfigError(f"report: {path} is neither a result file nor a directory")
    return list(found)


def row_identity(row: dict) -> str:
    """A row's identity across result files: its experiment plus ``retrieval_key`` or ``point_key`` (the sweep's
    identity is per results file; across files the experiment tells runs apart)."""
    kind = row.get("kind")
    key = retrieval_key(row) if kind == KIND else harness_key(row) if kind == HARNESS_KIND else point_key(row)
    return json.dumps(row.get("experiment")) + key


def _is_ppl(row: dict) -> bool:
    """Whether ``row`` is a perplexity point (not a retrieval trial nor a harness task)."""
    return row.get("kind") not in (KIND, HARNESS_KIND)


def unique_rows(rows) -> list[dict]:
    """Each (experiment, identity) once, in order: its first finished row (``lce.eval.store.first_finished``)."""
    return list(first_finished(rows, row_identity).values())


def load_rows(paths: list[str | Path]) -> list[dict]:
    """Finished rows of every result file under ``paths`` (files in ``find_result_files`` order), ``unique_rows``."""
    return unique_rows(row for file in find_result_files(paths) for row in ResultStore(file).rows())


def select(rows: list[dict], experiments: list[str] | None = None, runs: list[str] | None = None) -> list[dict]:
    """Rows whose ``experiment`` is one of ``experiments`` and whose ``run`` matches one of the glob ``runs``."""
    if experiments:
        rows = [r for r in rows if str(r.get("experiment")) in experiments]
    if runs:
        rows = [r for r in rows if any(fnmatch.fnmatchcase(str(r["run"]), pattern) for pattern in runs)]
    return rows


def _protocol_name(row: dict) -> str:
    protocol = row.get("protocol")
    return str(protocol.get("name", "")) if isinstance(protocol, dict) else str(protocol or "")


def _attention_name(row: dict) -> str:
    """The attention variant a row ran with (``params.attention``: name + changed fields), ``""`` where not
    recorded."""
    params = row.get("params")
    attention = params.get("attention") if isinstance(params, dict) else None
    if not isinstance(attention, dict):
        return ""
    return " ".join([str(attention.get("name", "")), *(f"{k}={v}" for k, v in attention.items() if k != "name")])


class Labeller:
    """Series labels built from the parts (experiment, run, attention, protocol) that vary across ``rows``. The
    attention part matters where ``eval.posencs`` names the series: a sweep labels its series by position encoding,
    so ``rope`` under full attention and ``rope`` under ``attention=moba`` are two series only by it."""

    def __init__(self, rows: list[dict]):
        self.experiment = len({r.get("experiment") for r in rows}) > 1
        self.attention = len({_attention_name(r) for r in rows}) > 1
        self.protocol = len({_protocol_name(r) for r in rows if _is_ppl(r)}) > 1

    def __call__(self, row: dict) -> str:
        label = str(row["run"])
        if self.attention and (attention := _attention_name(row)):
            label = f"{label} + {attention}"
        if self.experiment:
            label = f"{row.get('experiment')}/{label}"
        if self.protocol and _is_ppl(row):
            label = f"{label} [{_protocol_name(row)}]"
        if row.get("aggregation", TOKEN_MEAN) != TOKEN_MEAN and _is_ppl(row):
            label += " †"
        return label


SERIES_CLASH = ("report: two different points for series '{name}' at length {length} (they differ in model, params, "
                "seed or protocol); select one with --run / --experiment, or give the runs distinct names")


def ppl_table(rows: list[dict], label: Labeller) -> tuple[list[str], list[int], dict[str, dict[int, dict]]]:
    """``(series, lengths, table[series][length] = row)`` of the perplexity rows (``lce.eval.report.series_table``),
    series and lengths sorted.

    Raises:
        ConfigError: if two different points share a series and a length.
    """
    names, lengths, table = series_table((r for r in unique_rows(rows) if _is_ppl(r)), label,
                                         SERIES_CLASH)
    return sorted(names), lengths, table


def retrieval_cells(rows: list[dict], label: Labeller) -> dict[tuple[str, str], list[dict]]:
    """Accuracy cells per (series, task), sorted; see ``lce.eval.retrieval.cell_accuracy``.

    Raises:
        ConfigError: if one series and task mixes trials of different task parameters.
    """
    retrieval = [r for r in unique_rows(rows) if r.get("kind") == KIND]
    protocols: dict[tuple[str, str], set[str]] = {}
    for row in retrieval:
        protocols.setdefault((label(row), row["task"]), set()).add(json.dumps(row["protocol"], sort_keys=True))
    for (name, task), variants in protocols.items():
        if len(variants) > 1:
            raise ConfigError(f"report: series '{name}' has {task} trials with {len(variants)} different task "
                              "parameter sets; select one with --run / --experiment")
    grouped: dict[tuple[str, str], list[dict]] = {}
    for cell in cell_accuracy(retrieval, label):
        grouped.setdefault((cell["series"], cell["task"]), []).append(cell)
    return {key: sorted(cells, key=lambda c: (c["depth"], c["length"])) for key, cells in sorted(grouped.items())}


def _markdown_table(header: list[str], body: list[list[str]], align: list[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def _ppl_cell(row: dict | None, best: float | None) -> str:
    if row is None:
        return "-"
    if row["status"] != OK:
        return STATUS_TEXT.get(row["status"], row["status"])
    text = format_ppl(row["ppl"])
    if row["ppl"] == best:
        text = f"**{text}**"
    if row.get("ppl_low") is not None and row.get("ppl_high") is not None:
        text += f" ({format_ppl(row['ppl_low'])}–{format_ppl(row['ppl_high'])})"
    return text


def _number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(rows: list[dict], title: str | None = None) -> str:
    """The whole comparison as markdown: perplexity, tokens/s and peak memory per series x length, then one
    depth x length accuracy table per retrieval series and task (only its **all** row for a task without depth),
    then one table of lm-eval metrics per harness task (``harness_markdown``), then RULER's average per series x
    length when there are RULER tasks (``ruler_average``)."""
    label = Labeller(rows)
    out = [f"# {title or 'lce report'}", ""]
    names, lengths, table = ppl_table(rows, label)
    if names:
        header = ["series", *map(str, lengths)]
        align = [":--", *["--:"] * len(lengths)]
        best = best_per_length(table, lengths)
        body = [[name, *(_ppl_cell(table[name].get(n), best[n]) for n in lengths)] for name in names]
        out += ["## Perplexity", "", *_markdown_table(header, body, align), ""]
        notes = ["Best per length in bold", "(low–high): bootstrap confidence interval over documents",
                 STATUS_NOTES[OOM], "-: not evaluated"]
        if any(row["status"] == NONFINITE for series in table.values() for row in series.values()):
            notes.insert(3, STATUS_NOTES[NONFINITE])
        if any("†" in name for name in names):
            notes.append("†: mean of per-window (or per-batch) mean losses, as the protocol's reference reports it, "
                         "not token-weighted")
        out += ["; ".join(notes) + ".", ""]
        for heading, field, fmt in (("Tokens per second", "tokens_per_s", ".0f"),
                                    ("Peak memory (MiB)", "peak_mem_mb", ".1f")):
            body = [[name, *(_number(table[name][n].get(field), fmt) if n in table[name] else "-" for n in lengths)]
                    for name in names]
            out += [f"## {heading}", "", *_markdown_table(header, body, align), ""]
    for (name, task), cells in retrieval_cells(rows, label).items():
        lengths = sorted({c["length"] for c in cells})
        depths = sorted({c["depth"] for c in cells})
        grid = {(c["depth"], c["length"]): c for c in cells}
        body = []
        for depth in depths if depths != [None] else []:
            row = [f"{depth:.0%}"]
            for length in lengths:
                cell = grid.get((depth, length))
                row.append("-" if cell is None else "OOM" if cell["accuracy"] is None else f"{cell['accuracy']:.0%}")
            body.append(row)
        means = [length_accuracy(cells, length) for length in lengths]
        body.append(["**all**", *("OOM" if mean is None else f"{mean:.0%}" for mean in means)])
        out += [f"## Retrieval accuracy: {task}, {name}", "",
                *_markdown_table(["depth \\ length", *map(str, lengths)], body, ["--:"] * (len(lengths) + 1)), ""]
    out += harness_markdown(rows, label)
    out += _ruler_average_section(rows, label)
    if len(out) == 2:
        out += ["No finished rows.", ""]
    return "\n".join(out)


def length_accuracy(cells: list[dict], length: int) -> float | None:
    """Accuracy of one series and task at ``length`` over all its depths: finished trials' mean score (None: none
    finished)."""
    done = [c for c in cells if c["length"] == length and c["trials"]]
    trials = sum(c["trials"] for c in done)
    return sum(c["accuracy"] * c["trials"] for c in done) / trials if trials else None


def ruler_average(rows: list[dict], label: Labeller | None = None) -> dict[str, dict[int, tuple[float, int]]]:
    """RULER's average per series and length: the mean over RULER tasks (``ruler_*``) of each task's accuracy at that
    length (``length_accuracy``), as RULER averages its task scores. Returns ``{series: {length: (average, number of
    tasks)}}``; a length where a task ran out of memory everywhere counts that task as missing."""
    per_task: dict[str, dict[int, list[float]]] = {}
    for (name, task), cells in retrieval_cells(rows, label or Labeller(rows)).items():
        if not task.startswith(RULER_PREFIX):
            continue
        for length in sorted({c["length"] for c in cells}):
            accuracy = length_accuracy(cells, length)
            if accuracy is not None:
                per_task.setdefault(name, {}).setdefault(length, []).append(accuracy)
    return {name: {n: (sum(a) / len(a), len(a)) for n, a in sorted(lengths.items())}
            for name, lengths in sorted(per_task.items())}


def _ruler_average_section(rows: list[dict], label: Labeller) -> list[str]:
    average = ruler_average(rows, label)
    if not average:
        return []
    lengths = sorted({n for series in average.values() for n in series})
    body = [[name, *(f"{series[n][0]:.1%} ({series[n][1]})" if n in series else "-" for n in lengths)]
            for name, series in average.items()]
    return ["## RULER average", "", *_markdown_table(["series", *map(str, lengths)], body,
                                                     [":--", *["--:"] * len(lengths)]),
            "", "Mean over RULER tasks of each task's accuracy at the length (number of tasks in brackets).", ""]


def ppl_csv(rows: list[dict]) -> str:
    """Perplexity points in long format (``PPL_COLUMNS``), sorted by series and length."""
    names, lengths, table = ppl_table(rows, Labeller(rows))
    records = ({**row, "series": name, "protocol": _protocol_name(row),
                "aggregation": row.get("aggregation", TOKEN_MEAN)}
               for name in names for length in lengths if (row := table[name].get(length)) is not None)
    return csv_text(PPL_COLUMNS, records)


def retrieval_csv(rows: list[dict]) -> str:
    """Retrieval accuracy cells in long format (``RETRIEVAL_COLUMNS``), sorted by series, task, depth, length."""
    cells = retrieval_cells(rows, Labeller(rows)).values()
    return csv_text(RETRIEVAL_COLUMNS, (cell for series_cells in cells for cell in series_cells))


def _train_length(rows: list[dict]) -> int | None:
    lengths = {r.get("train_length") for r in rows}
    return lengths.pop() if len(lengths) == 1 and None not in lengths else None


def default_title(rows: list[dict]) -> str | None:
    """The rows' experiment when they hold exactly one (the end of a sweep's report), else None."""
    experiments = {r.get("experiment") for r in rows}
    return str(experiments.pop()) if len(experiments) == 1 and None not in experiments else None


def harness_metrics(row: dict) -> dict[str, object]:
    """The metrics of a harness row as ``"<task> <metric>"`` -> value (lm-eval's ``results`` and ``groups``, without
    standard errors; a metric under a filter other than ``none`` keeps it: ``"exact_match,strict"``)."""
    metrics: dict[str, object] = {}
    for part in ("results", "groups"):
        for task, values in (row.get(part) or {}).items():
            for key, value in values.items():
                if key in ("alias", "name", "sample_len") or "_stderr" in key:
                    continue
                metric = key.removesuffix(",none")
                metrics[f"{task} {metric}"] = value
    return metrics


def harness_markdown(rows: list[dict], label: Labeller) -> list[str]:
    """One table per harness task (``lce.eval.harness``): its metrics (columns) per series (rows)."""
    tasks: dict[str, dict[str, dict]] = {}
    for row in unique_rows(rows):
        if row.get("kind") == HARNESS_KIND:
            tasks.setdefault(row["task"], {})[label(row)] = row
    out = []
    for task, series in tasks.items():
        metrics = {(name, row["status"]): harness_metrics(row) for name, row in sorted(series.items())}
        columns = sorted({column for values in metrics.values() for column in values})
        body = [[name, *(status.upper() if status != OK else _harness_value(values.get(column)) for column in columns)]
                for (name, status), values in metrics.items()]
        out += [f"## Harness: {task}", "", *_markdown_table(["series", *columns], body,
                                                              [":--", *["--:"] * len(columns)]), ""]
    return out


def _harness_value(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(rows: list[dict], out_dir: Path, title: str | None = None,
                 train_length: int | None = None) -> dict[str, Path]:
    """Write the report of ``rows`` into ``out_dir``: what ``lce report --out`` and the end of a sweep write.

    ``report.md`` (``markdown``), ``ppl_vs_length.csv`` (``ppl_csv``), ``ppl_vs_length.png`` (``plot``) and
    ``nll_vs_position.png`` (``plot_position_nll``) when there are perplexity rows, ``retrieval.csv`` and one
    ``retrieval_<series>_<task>.png`` heatmap per series and task with depths when there are retrieval rows.

    Args:
        rows: result rows (``load_rows``), perplexity points and retrieval trials.
        title: of the markdown and the plots; None: ``default_title``.
        train_length: the length marked in the plots; None: the rows' ``train_length`` when they agree.

    Returns:
        The paths written by kind: ``md``, ``ppl_csv``, ``ppl_png``, ``position_png``, ``retrieval_csv`` and
        ``heatmap:<series>:<task>``.
    """
    title = title or default_title(rows)
    train_length = train_length if train_length is not None else _train_length(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "report.md"}
    paths["md"].write_text(markdown(rows, title) + "\n", encoding="utf-8")
    label = Labeller(rows)
    ppl_rows = [{**r, "run": label(r)} for r in unique_rows(rows) if _is_ppl(r)]
    if ppl_rows:
        paths["ppl_csv"] = out_dir / "ppl_vs_length.csv"
        paths["ppl_csv"].write_text(ppl_csv(rows), encoding="utf-8")
        paths["ppl_png"] = plot(ppl_rows, out_dir / "ppl_vs_length.png", train_length=train_length,
                                title=f"{title}: perplexity vs length" if title else None)
        paths["position_png"] = plot_position_nll(ppl_rows, out_dir / "nll_vs_position.png", train_length)
    cells = retrieval_cells(rows, label)
    if cells:
        paths["retrieval_csv"] = out_dir / "retrieval.csv"
        paths["retrieval_csv"].write_text(retrieval_csv(rows), encoding="utf-8")
    with_depth = {key: series_cells for key, series_cells in cells.items()
                  if any(c["depth"] is not None for c in series_cells)}
    for (name, task), path in write_heatmaps(with_depth, out_dir, train_length).items():
        paths[f"heatmap:{name}:{task}"] = path
    return paths


def report_outputs(paths: dict[str, Path]) -> dict[str, list[Path]]:
    """``write_report``'s paths grouped as ``lce report`` and the end of a run print them (``print_outputs``)."""
    groups: dict[str, list[Path]] = {}
    for path in paths.values():
        kind = {".md": "report", ".csv": "tables"}.get(path.suffix, "plots")
        groups.setdefault(kind, []).append(path)
    return groups


def log_wandb(rows: list[dict], paths: dict[str, Path], project: str, name: str | None, out_dir: Path) -> None:
    """Log the comparison to Weights & Biases: tables of points and cells, and every plot."""
    import wandb

    from lce.loggers import wandb_key_available

    mode = os.environ.get("WANDB_MODE") or "online"
    if mode == "online" and not wandb_key_available():
        mode = "offline"
    run = wandb.init(project=project, name=name, job_type="report", mode=mode, dir=str(out_dir),
                     settings=wandb.Settings(console="off", silent=True))
    try:
        payload = {}
        for key, text in (("ppl", ppl_csv(rows)), ("retrieval", retrieval_csv(rows))):
            table = list(csv.reader(io.StringIO(text)))
            if len(table) > 1:
                payload[key] = wandb.Table(columns=table[0], data=table[1:])
        for key, path in paths.items():
            if path.suffix == ".png":
                payload[key.replace(":", "/")] = wandb.Image(str(path))
        run.log(payload)
    finally:
        run.finish()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lce report", description="Compare the results of any set of lce runs.")
    p.add_argument("paths", nargs="+",
                   help="results.jsonl / retrieval.jsonl / harness.jsonl files or directories holding them")
    p.add_argument("--out", type=Path, help="write report.md, CSVs and plots into this directory")
    p.add_argument("--format", choices=("md", "csv"), default="md", help="what to print (default: md)")
    p.add_argument("--experiment", action="append", help="keep only this experiment (repeatable)")
    p.add_argument("--run", action="append", help="keep only runs matching this glob (repeatable)")
    p.add_argument("--title", help="report title")
    p.add_argument("--train-length", type=int, help="mark this length in plots (default: the rows' train_length)")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (offline without an API key)")
    p.add_argument("--wandb-project", default="lce", help="wandb project (default: lce)")
    return p


def selected_rows(paths: list[str | Path], experiments: list[str] | None = None,
                  runs: list[str] | None = None) -> list[dict]:
    """The finished rows under ``paths`` (``load_rows``) that ``select`` keeps.

    Raises:
        ConfigError: if there are none.
    """
    rows = select(load_rows(paths), experiments, runs)
    if not rows:
        raise ConfigError("report: no finished rows in the given paths (after --experiment / --run filters)")
    return rows


def report_text(rows: list[dict], title: str | None = None, fmt: str = "md") -> str:
    """What the report prints: ``markdown`` (title: ``default_title`` when None), or with ``fmt="csv"`` the
    perplexity CSV and the retrieval CSV, each only when there are such rows."""
    if fmt == "md":
        return markdown(rows, title or default_title(rows))
    parts = [ppl_csv(rows) if any(_is_ppl(r) for r in rows) else "",
             retrieval_csv(rows) if any(r.get("kind") == KIND for r in rows) else ""]
    return "\n".join(p for p in parts if p).rstrip("\n")


def report(rows: list[dict], out_dir: Path | None, title: str | None = None, train_length: int | None = None,
           fmt: str = "md") -> dict[str, Path]:
    """The one report pipeline, of ``lce report`` and of the end of a sweep: print ``report_text`` and, with
    ``out_dir``, write the files (``write_report``). Returns their paths by kind, which the caller prints
    (``print_outputs(report_outputs(paths))``, at once or with the rest of a run's outputs)."""
    text = report_text(rows, title, fmt)
    paths = write_report(rows, out_dir, title, train_length) if out_dir is not None else {}
    print(text)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Run ``lce report``; returns the exit status (2 for bad input, reported as one line on stderr)."""
    args = parser().parse_args(argv)
    try:
        rows = selected_rows(args.paths, args.experiment, args.run)
        paths = report(rows, args.out, args.title, args.train_length, args.format)
        if args.wandb:
            log_wandb(rows, paths, args.wandb_project, args.title, args.out or Path.cwd())
    except LceError as e:
        print(f"lce report: error: {e}", file=sys.stderr)
        return 2
    print_outputs(report_outputs(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
