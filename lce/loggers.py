"""Experiment loggers (the ``logger`` config group): none, or Weights & Biases.

wandb never prompts or blocks: the mode always comes from the config, and ``online`` without an API key falls back
to ``offline`` with a warning (with a TTY and no key, ``wandb.init`` would wait for interactive input).
"""

from __future__ import annotations

import netrc
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lce.registry import Registry

LOGGERS: Registry = Registry("logger")


class Run:
    """A logging session; the base class logs nothing."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_sweep(self, rows: list[dict], plot_path: Path | None) -> None:
        pass

    def finish(self) -> None:
        pass


@LOGGERS.register("none")
@dataclass(frozen=True)
class NoLogger:
    """Log nothing beyond lce's own files (train_log.jsonl, results.jsonl, CSV, PNG)."""

    name: str = "none"

    def start(self, config: dict, run_name: str, out_dir: Path) -> Run:
        return Run()


def wandb_key_available() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return auth is not None


@LOGGERS.register("wandb")
@dataclass(frozen=True)
class WandbLogger:
    """Weights & Biases: training metrics, and the sweep as a table plus a perplexity-vs-length line plot."""

    name: str = "wandb"
    project: str = "lce"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] = "offline"

    def start(self, config: dict, run_name: str, out_dir: Path) -> Run:
        import wandb

        mode = self.mode
        if mode == "online" and not wandb_key_available():
            warnings.warn("logger.mode=online but no wandb API key is set (WANDB_API_KEY or netrc): logging offline")
            mode = "offline"
        run = wandb.init(
            project=self.project, entity=self.entity, group=self.group, tags=list(self.tags), name=run_name,
            config=config, dir=str(out_dir), mode=mode, reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True),
        )
        return WandbRun(run)


class WandbRun(Run):
    def __init__(self, run: Any):
        self.run = run

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def log_sweep(self, rows: list[dict], plot_path: Path | None) -> None:
        import wandb

        columns = ["run", "method", "length", "status", "ppl", "nll", "tokens", "tokens_per_s", "peak_mem_mb"]
        table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        payload: dict[str, Any] = {"ppl_vs_length": table}
        ok = [row for row in rows if row.get("status") == "ok"]
        if ok:
            series = sorted({row["run"] for row in ok})
            lengths = sorted({row["length"] for row in ok})
            ys = [[next((r["ppl"] for r in ok if r["run"] == s and r["length"] == x), float("nan")) for x in lengths]
                  for s in series]
            payload["ppl_vs_length_plot"] = wandb.plot.line_series(
                xs=lengths, ys=ys, keys=series, title="perplexity vs length", xname="length")
        if plot_path is not None and Path(plot_path).is_file():
            payload["ppl_vs_length_png"] = wandb.Image(str(plot_path))
        self.run.log(payload)

    def finish(self) -> None:
        self.run.finish()
