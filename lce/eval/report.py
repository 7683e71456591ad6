"""The pieces of the report of perplexity-vs-length results: a series x length table, long-format CSV text, a log-log
plot and a loss-by-position plot.

Rows are those written by ``lce.eval.sweep`` (see its schema); a row's series is its ``run`` field. A point written
twice counts once, by the store's rule (``lce.eval.store.first_finished``). Points without a perplexity (``oom``,
``nonfinite``) are named in the table and CSV and marked or named in the plots, never plotted as values. Plots are
drawn on a ``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot, so they neither need a display nor
change the backend or figures of a user's pyplot session.

The report itself, which ``lce report`` and the end of a sweep both write, is ``lce.eval.compare.write_report``,
built from these pieces.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatter, NullLocator

from lce.errors import ConfigError
from lce.eval.sweep import NONFINITE, OK, OOM, first_finished, point_key

# How a point without a perplexity shows in tables and what the note under them says.
STATUS_TEXT = {OOM: "OOM", NONFINITE: "non-finite"}
STATUS_NOTES = {OOM: "OOM: out of memory", NONFINITE: "non-finite: NaN or infinite loss, no perplexity"}


def label(row: dict) -> str:
    """The series a row belongs to: its ``run`` name."""
    return str(row["run"])


def points(rows: list[dict]) -> list[dict]:
    """Each point's row once, in order of first appearance (``lce.eval.store.first_finished``: of a point written
    twice the first finished row; unfinished rows left out)."""
    return list(first_finished(rows, point_key).values())


# What a clash in ``series_table`` says: here two points under one run name; ``lce report`` names its own remedy.
RUN_CLASH = ("two different points for run '{name}' at length {length} (they differ in method, params, model, seed "
             "or protocol); give each series its own run name")


def series_table(
    rows: Iterable[dict], label: Callable[[dict], str], clash: str = RUN_CLASH
) -> tuple[list[str], list[int], dict[str, dict[int, dict]]]:
    """Perplexity rows, each point once (``points``, or ``lce report``'s ``unique_rows``), as a series x length table:
    the one table both the end-of-sweep report and ``lce report`` are drawn from.

    Returns:
        ``(labels, lengths, table)``: labels (``label(row)``) in order of first appearance, lengths ascending, and
        ``table[label][length]`` the row (absent where a series has no row at that length).

    Raises:
        ConfigError: if two different points share a series and a length; ``clash`` is the message, formatted with
            ``name`` and ``length``.
    """
    table: dict[str, dict[int, dict]] = {}
    for row in rows:
        name, length = label(row), int(row["length"])
        series = table.setdefault(name, {})
        if length in series:
            raise ConfigError(clash.format(name=name, length=length))
        series[length] = row
    lengths = sorted({length for series in table.values() for length in series})
    return list(table), lengths, table


def best_per_length(table: dict[str, dict[int, dict]], lengths: list[int]) -> dict[int, float | None]:
    """The lowest perplexity of each length of a ``series_table``, or None where fewer than two series have one
    (nothing to set in bold)."""
    best: dict[int, float | None] = {}
    for length in lengths:
        values = [float(s[length]["ppl"]) for s in table.values() if length in s and s[length]["status"] == OK]
        best[length] = min(values) if len(values) > 1 else None
    return best


def pivot(rows: list[dict]) -> tuple[list[str], list[int], dict[str, dict[int, float | str]]]:
    """Rows as a series x length table of values, each point once (``points``); see ``series_table``.

    Returns:
        ``(labels, lengths, table)``: labels in order of first appearance, lengths ascending, and
        ``table[label][length]`` the perplexity, or the status (``"oom"``, ``"nonfinite"``) of a point without one
        (absent where a series has no row at that length).

    Raises:
        ConfigError: if two different points (``point_key``: e.g. two seeds under one run name) share a series and a
            length.
    """
    labels, lengths, table = series_table(points(rows), label)
    values = {name: {length: float(row["ppl"]) if row["status"] == OK else row["status"]
                     for length, row in series.items()} for name, series in table.items()}
    return labels, lengths, values


def format_ppl(ppl: float) -> str:
    """Perplexity with 4 significant digits but at least 2 decimals (``3.142``, ``31.42``, ``314.16``)."""
    if not math.isfinite(ppl):
        return str(ppl)
    if ppl >= 1e5:
        return f"{ppl:.3e}"
    decimals = max(2, 3 - math.floor(math.log10(max(ppl, 1.0))))
    return f"{ppl:.{decimals}f}"


def format_length(length: float) -> str:
    """``4096 -> "4k"``, ``1048576 -> "1M"``, ``96 -> "96"``."""
    length = int(length)
    for size, suffix in ((2**20, "M"), (2**10, "k")):
        if length >= size and length % size == 0:
            return f"{length // size}{suffix}"
    return str(length)


def csv_cell(value) -> str | int | float:
    """A value as a CSV cell: structured values (params, model) as canonical JSON; missing values as empty cells."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def csv_text(columns: Sequence[str], records: Iterable[dict]) -> str:
    """Long-format CSV: a header of ``columns``, then one line per record (``csv_cell`` of each column's value)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for record in records:
        writer.writerow(csv_cell(record.get(c)) for c in columns)
    return buffer.getvalue()


MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def series_style(index: int) -> tuple[str, str]:
    """Colour and marker of the ``index``-th series: 10 colours x 7 markers, so no two of 70 series look alike."""
    return f"C{index % 10}", MARKERS[(index // 10) % len(MARKERS)]


def plot(rows: list[dict], path: str | Path, train_length: int | None = None, title: str | None = None) -> Path:
    """Plot perplexity (log) against length (log2), one line per series, and save a PNG.

    OOM points are drawn as crosses in the series' colour along the top edge of the axes, since they have no
    perplexity to place them by; points with a non-finite loss are left out and named in the series' legend entry.
    The legend sits outside the axes so it never hides a line.
    """
    labels, lengths, table = pivot(rows)
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    oom_row = 0
    for i, name in enumerate(labels):
        color, marker = series_style(i)
        series = sorted(table[name].items())
        finite = [(length, v) for length, v in series if isinstance(v, float) and math.isfinite(v)]
        xs, ys = zip(*finite) if finite else ((), ())
        nonfinite = [length for length, v in series if v == NONFINITE]
        ax.plot(xs, ys, marker=marker, markersize=4, color=color, label=name + _nonfinite_note(nonfinite))
        ooms = [length for length, v in series if v == OOM]
        if ooms:
            # Stagger the crosses of different series so that OOMs at the same length stay distinguishable.
            y = 0.97 - 0.04 * oom_row
            oom_row += 1
            ax.plot(
                ooms, [y] * len(ooms), linestyle="none", marker="x", markersize=8, markeredgewidth=2, color=color,
                transform=ax.get_xaxis_transform(), clip_on=False,
            )
    handles, names = ax.get_legend_handles_labels()
    if train_length is not None:
        handles.append(ax.axvline(train_length, linestyle="--", color="0.4", linewidth=1))
        names.append(f"train length ({format_length(train_length)})")
    if oom_row:
        handles.append(Line2D([], [], linestyle="none", marker="x", markeredgewidth=2, color="0.3"))
        names.append("out of memory")
    ticks = sorted(set(lengths) | ({train_length} if train_length is not None else set()))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_length(x)))
    ax.xaxis.set_minor_locator(NullLocator())
    if ticks:
        ax.set_xlim(min(ticks) / 2**0.3, max(ticks) * 2**0.3)
    # Plain numbers instead of 10^k; minor ticks are labelled only when the axis spans about a decade or less.
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    ax.grid(True, which="both", alpha=0.25)
    ax.set_xlabel("evaluation length (tokens, log2 scale)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title or "Perplexity vs evaluation length")
    ax.legend(handles, names, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path


def _nonfinite_note(lengths: list[int]) -> str:
    """The legend suffix of a series with non-finite points at ``lengths``, which are not plotted."""
    if not lengths:
        return ""
    return f" (non-finite loss at {', '.join(format_length(n) for n in sorted(lengths))}: not plotted)"


def plot_position_nll(rows: list[dict], path: str | Path, train_length: int | None = None,
                      title: str | None = None) -> Path:
    """Plot mean NLL per position bucket at each series' longest scored length, and save a PNG.

    The first ``train_length`` positions show in-distribution quality; the rest show where extrapolation breaks,
    which a single perplexity per length averages away. Points with a non-finite loss have no buckets to draw: they
    are named in the series' legend entry (an entry without a line when the series has no finite point).
    """
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = points(rows)
    for i, name in enumerate(dict.fromkeys(label(r) for r in rows)):
        series = [r for r in rows if label(r) == name]
        scored = [r for r in series if r["status"] == OK and r.get("bucket_nll")]
        note = _nonfinite_note([int(r["length"]) for r in series if r["status"] == NONFINITE])
        color, marker = series_style(i)
        if not scored:
            if note:
                ax.plot([], [], marker=marker, markersize=3, color=color, label=name + note)
            continue
        row = max(scored, key=lambda r: int(r["length"]))
        size = int(row["bucket_size"])
        # Bucket b holds predictions made at positions [b*size, (b+1)*size); plot it at its midpoint.
        xs = [b * size + min(size, int(row["length"]) - 1 - b * size) / 2 for b in range(len(row["bucket_nll"]))]
        ax.plot(xs, row["bucket_nll"], marker=marker, markersize=3, color=color,
                label=f"{name} (L={format_length(int(row['length']))}){note}")
    if train_length is not None:
        ax.axvline(train_length, linestyle="--", color="0.4", linewidth=1,
                   label=f"train length ({format_length(train_length)})")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_length(x)))
    ax.grid(True, which="both", alpha=0.25)
    ax.set_xlabel("position in the window (tokens, log2 scale)")
    ax.set_ylabel("mean NLL per position bucket (nats)")
    ax.set_title(title or "Loss by position")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path


def print_outputs(outputs: dict[str, list[Path]]) -> None:
    """Say where a run or ``lce report`` left what it made: results, report, tables, plots, model."""
    width = max(map(len, outputs), default=0)
    for kind, paths in outputs.items():
        print(f"{kind:>{width}}: {', '.join(str(p) for p in paths)}")
