"""Retrieval accuracy as a depth x length heatmap PNG, one cell per (length, depth), annotated with its accuracy.

Drawn on a ``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot (see ``lce.eval.report``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from lce.errors import ConfigError
from lce.eval.report import format_length


def accuracy_grid(cells: list[dict]) -> tuple[list[int], list[float], np.ndarray, np.ndarray]:
    """``(lengths, depths, accuracy [depths, lengths], oom [depths, lengths])`` of one series' cells
    (``lce.eval.retrieval.cell_accuracy`` output); missing cells are NaN and not OOM.

    Raises:
        ConfigError: if two cells share a length and a depth (cells of several series or tasks mixed up).
    """
    lengths = sorted({int(c["length"]) for c in cells})
    depths = sorted({float(c["depth"]) for c in cells})
    accuracy = np.full((len(depths), len(lengths)), np.nan)
    oom = np.zeros_like(accuracy, dtype=bool)
    seen = set()
    for c in cells:
        i, j = depths.index(float(c["depth"])), lengths.index(int(c["length"]))
        if (i, j) in seen:
            raise ConfigError(f"two cells at length {c['length']}, depth {c['depth']}: "
                              "plot one series and task at a time")
        seen.add((i, j))
        if c["accuracy"] is not None:
            accuracy[i, j] = c["accuracy"]
        oom[i, j] = c["status"] == "oom"
    return lengths, depths, accuracy, oom


def plot_heatmap(cells: list[dict], path: str | Path, title: str | None = None,
                 train_length: int | None = None) -> Path:
    """Save a heatmap of ``cells``: lengths left to right, depth 0 (start of the haystack) at the top.

    Each cell shows its accuracy in percent (red 0% to green 100%); cells that ran out of memory are grey with
    "OOM", cells without trials are blank. ``train_length`` marks the columns beyond the training length.
    """
    lengths, depths, accuracy, oom = accuracy_grid(cells)
    fig = Figure(figsize=(2.8 + 0.7 * len(lengths), 2.2 + 0.4 * len(depths)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(accuracy), cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    if oom.any():
        ax.imshow(np.ma.masked_where(~oom, np.ones_like(accuracy)), cmap=ListedColormap(["0.75"]), aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if oom[i, j]:
                text = "OOM"
            elif np.isnan(accuracy[i, j]):
                continue
            else:
                text = f"{accuracy[i, j]:.0%}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black")
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    if train_length is not None:
        beyond = [j for j, n in enumerate(lengths) if n > train_length]
        if beyond:
            ax.axvline(beyond[0] - 0.5, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title(title or "Retrieval accuracy")
    fig.colorbar(image, ax=ax, label="accuracy", format=PercentFormatter(1.0, decimals=0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path


def slug(text: str) -> str:
    """``text`` as a file-name part: runs of characters other than letters, digits and ``_.=-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "series"


def write_heatmaps(cells: dict[tuple[str, str], list[dict]], out_dir: Path,
                   train_length: int | None = None) -> dict[tuple[str, str], Path]:
    """One heatmap per (series, task) of ``cells``, ``retrieval_<series>_<task>.png`` in ``out_dir``: the files the
    end of a run and ``lce report`` both write. Returns their paths by (series, task)."""
    return {
        (name, task): plot_heatmap(series_cells, out_dir / f"retrieval_{slug(name)}_{slug(task)}.png",
                                   title=f"{task}: {name}", train_length=train_length)
        for (name, task), series_cells in cells.items()
    }
