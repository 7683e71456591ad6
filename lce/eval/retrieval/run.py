"""Retrieval trials through the resumable point runner (``lce.eval.runner``): one row per (length, depth, trial),
and their accuracy per cell."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lce.config import check
from lce.errors import ConfigError
from lce.eval.retrieval.generate import GenerateFn
from lce.eval.retrieval.prompt import Prompt
from lce.eval.retrieval.tasks import iter_cells
from lce.eval.runner import PointRunner, measure, utc_now
from lce.eval.shard import Shard, current_shard, run_on_main
from lce.eval.store import META_FIELDS, OK, OOM, ResultStore, point_key

KIND = "retrieval"
TRIAL_FIELDS = ("depth", "trial")


def retrieval_key(row: dict) -> str:
    """Identity of one trial: ``point_key`` (run, method, params, model, length, seed, protocol) + depth and trial."""
    missing = [k for k in TRIAL_FIELDS if k not in row]
    if missing:
        raise ConfigError(f"retrieval row lacks field(s) {', '.join(missing)}")
    return point_key(row) + json.dumps({k: row[k] for k in TRIAL_FIELDS}, sort_keys=True, separators=(",", ":"))


def _trial_key(row: dict) -> str | None:
    """``retrieval_key`` of a retrieval row; None for the rows of other evaluations a store may hold."""
    return retrieval_key(row) if row.get("kind") == KIND else None


def is_correct(config, output: str, answer: int) -> bool:
    """Whether ``output`` retrieves ``answer`` under the task's match rule (``config.is_correct``)."""
    return config.is_correct(output, answer)


def run_retrieval(
    generate_fn: GenerateFn,
    tokenizer,
    config,
    store: ResultStore | str | Path,
    *,
    meta: dict,
    haystack_text: str | None = None,
    bos_id: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    shard: Shard | None = None,
) -> list[dict]:
    """Run every (length, depth, trial) of ``config`` not yet in ``store``, appending one row per trial.

    Under a multi-process launcher only the main process runs the trials and writes ``store`` (trials are not
    shared out), the others wait and get its rows, so no trial is run or written twice.

    Args:
        generate_fn: ``generate(ids [T], max_new_tokens) -> list[int]``; ``model_generate_fn(model, eos_id)``.
        tokenizer: an ``lce.data`` tokenizer (``encode``/``decode``).
        config: a retrieval task (``PasskeyConfig``, ``NeedleConfig``, a RULER task of ``lce.eval.retrieval.ruler``).
        store: the JSONL result file (or its path).
        meta: fields written into every row; must hold run, method, params, model and seed; an optional
            ``protocol`` dict is merged into the task's identity (e.g. the data source of the haystack).
        haystack_text: real text (``needle``, ``passkey`` with ``haystack=corpus``); see ``corpus_text``.
        bos_id: put before every plain prompt when given (not before a chat prompt: see ``PromptBuilder``).
        device: where memory is measured; None: CUDA when available.
        progress: show a progress bar.
        shard: this process's place among several; None: ``lce.eval.shard.current_shard()``.

    Returns:
        Every finished row of this identity in the store (earlier runs' and new; of a trial written twice, the
        first), ordered by length, depth, trial; the same on every process and in every run that wrote concurrently.

    Raises:
        LceError: ``store`` cannot be written (``ResultStore.check_writable``, before running any trial).

    Row schema: the ``meta`` fields, ``protocol`` (``PromptBuilder.identity()`` + meta's protocol), ``kind``
    ("retrieval"), ``task``, ``length``, ``depth``, ``trial``, ``status`` ("ok" | "oom"), ``prompt_tokens``,
    ``key_offset``, ``depth_actual``, ``answer``, ``output`` (decoded generation), the task's verdict
    (``config.judge``: ``parsed``, its first integer or RULER's postprocessed prediction, ``correct`` and, for RULER
    tasks, ``score``), ``seconds``, ``peak_mem_mb``, ``mem_kind``, ``time`` and, for OOM, ``error``. After an OOM, the
    remaining trials of that length and longer are recorded as OOM without running.
    """
    missing = [k for k in META_FIELDS if k not in meta and k != "protocol"]
    check(not missing, "meta", f"missing identity field(s) {', '.join(missing)}")
    store = store if isinstance(store, ResultStore) else ResultStore(store)
    return run_on_main(
        shard if shard is not None else current_shard(),
        lambda: _run_missing_trials(generate_fn, tokenizer, config, store, meta, haystack_text, bos_id, device,
                                    progress),
        "retrieval",
    )


def _run_missing_trials(generate_fn: GenerateFn, tokenizer, config, store: ResultStore, meta: dict,
                        haystack_text: str | None, bos_id: int | None, device, progress: bool) -> list[dict]:
    runner = PointRunner(store, _trial_key, Shard())  # run_on_main: this process alone
    builder = config.prompt_builder(tokenizer, haystack_text, bos_id)
    base = {**meta, "protocol": {**builder.identity(), **meta.get("protocol", {})}, "kind": KIND,
            "task": config.name}
    oom_at: int | None = None
    bar = tqdm(list(iter_cells(config)), desc=f"{config.name} retrieval", unit="trial", disable=not progress)
    for length, depth, trial in bar:
        identity = {**base, "length": length, "depth": depth, "trial": trial}
        if runner.finished(identity) is not None:
            continue
        bar.set_postfix_str(f"length={length}" + ("" if depth is None else f" depth={depth:g}"))
        if oom_at is not None and length >= oom_at:
            measured = _oom_fields(f"not run: length {oom_at} ran out of memory")
        else:
            measured = _run_trial(generate_fn, tokenizer, config, builder.prompt(length, depth, trial), device)
        # Another run of this evaluation may have written the trial meanwhile: then its row is the result.
        if runner.record(identity, measured)["status"] == OOM and oom_at is None:
            oom_at = length
    return runner.series_rows(base, order=lambda r: (r["length"], r["depth"], r["trial"]))


def _oom_fields(error: str) -> dict:
    return {
        "status": OOM, "prompt_tokens": None, "key_offset": None, "depth_actual": None, "answer": None,
        "output": None, "parsed": None, "correct": None, "seconds": None, "peak_mem_mb": None, "mem_kind": None,
        "time": utc_now(), "error": error,
    }


def _run_trial(generate_fn: GenerateFn, tokenizer, config, prompt: Prompt, device) -> dict:
    run = measure(lambda: tokenizer.decode(generate_fn(prompt.ids, config.max_new_tokens)), device)
    if run.error is not None:
        return {**_oom_fields(run.error), "prompt_tokens": prompt.ids.numel(), "answer": prompt.answer,
                "peak_mem_mb": run.peak_mem_mb, "mem_kind": run.mem_kind}
    output = run.value
    return {
        "status": OK, "prompt_tokens": prompt.ids.numel(), "key_offset": prompt.key_offset,
        "depth_actual": prompt.depth_actual, "answer": prompt.answer, "output": output,
        **config.judge(output, prompt.answer), "seconds": run.seconds, "peak_mem_mb": run.peak_mem_mb,
        "mem_kind": run.mem_kind, "time": utc_now(),
    }


def cell_accuracy(rows: Iterable[dict], label: Callable[[dict], str] = lambda row: str(row["run"])) -> list[dict]:
    """Accuracy per (series, task, length, depth) cell: the mean of the trials' ``score`` (RULER's partial credit,
    ``lce.eval.retrieval.ruler``), or of ``correct`` for rows without one.

    Returns:
        One dict per cell, in order of first appearance: ``series``, ``task``, ``length``, ``depth`` (None for tasks
        without depth), ``trials`` (finished trials), ``correct`` (fully correct trials), ``accuracy`` (None when
        every trial ran out of memory) and ``status`` ("ok" or "oom").
    """
    cells: dict[tuple, dict] = {}
    for row in rows:
        if row.get("kind") != KIND:
            continue
        depth = None if row["depth"] is None else float(row["depth"])
        key = (label(row), row["task"], int(row["length"]), depth)
        cell = cells.setdefault(key, {"series": key[0], "task": key[1], "length": key[2], "depth": key[3],
                                      "trials": 0, "correct": 0, "oom": 0, "score": 0.0})
        if row["status"] == "oom":
            cell["oom"] += 1
        else:
            cell["trials"] += 1
            cell["correct"] += bool(row["correct"])
            cell["score"] += float(row.get("score", bool(row["correct"])))
    out = []
    for cell in cells.values():
        oom, score = cell.pop("oom"), cell.pop("score")
        cell["accuracy"] = score / cell["trials"] if cell["trials"] else None
        cell["status"] = "ok" if cell["trials"] else ("oom" if oom else "ok")
        out.append(cell)
    return out
