"""Harness tasks through the resumable point runner (``lce.eval.runner``): one row per configured task, appended to
``harness.jsonl`` as soon as the task finishes; a rerun skips the tasks already stored, and a task stored twice by
two concurrent runs counts once (its first row), as every lce store reads.

Row schema: the ``meta`` fields (run, method, params, model, seed, ...), ``kind`` ("harness"), ``task`` (the
configured name), ``length`` (the model's ``max_length``; None: no bound), ``protocol`` (the lm-eval settings:
version, few-shot, limit, chat template, metadata, seed), ``status`` ("ok" | "oom"), ``results`` (lm-eval's
``results`` of the task and of its subtasks when it is a group: metric name -> value, e.g. ``"acc,none"``), ``groups``
(lm-eval's group aggregates), ``n_samples`` (per task: original and effective counts), ``n_shot``, ``seconds``,
``peak_mem_mb``, ``mem_kind``, ``time`` and, for an OOM, ``error``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lce.config import check
from lce.eval.harness import INSTALL, KIND, HarnessConfig, harness_key
from lce.eval.runner import PointRunner, measure, utc_now
from lce.eval.shard import Shard, current_shard, run_on_main
from lce.eval.store import META_FIELDS, OK, OOM, ResultStore


def import_lm_eval():
    """lm-eval's evaluator and task manager, or a one-line error saying how to install it."""
    from lce.errors import LceError

    try:
        import lm_eval
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise LceError(f"eval.harness needs lm-evaluation-harness ({e}); {INSTALL}") from None
    return lm_eval.__version__, simple_evaluate, TaskManager


def run_harness(
    model,
    tokenizer,
    config: HarnessConfig,
    store: ResultStore | str | Path,
    *,
    meta: dict,
    device: torch.device | str | None = None,
    backend: str = "auto",
    progress: bool = True,
    shard: Shard | None = None,
) -> list[dict]:
    """Run every task of ``config`` on ``model`` (already patched) that ``store`` does not hold yet.

    Only the main process of a multi-process launch runs the tasks and writes ``store``; the others get its rows.

    Args:
        model: a Hugging Face causal LM, patched by lce (or not).
        tokenizer: its lce tokenizer (``lce.data.tokenizer``).
        config: the tasks and lm-eval settings.
        store: the JSONL result file (or its path), ``harness.jsonl`` beside ``results.jsonl`` in an experiment.
        meta: fields written into every row; must hold run, method, params, model and seed.
        device: where the model runs; None: the device of its parameters.
        backend: lce's kernel backend.
        progress: show progress bars.
        shard: this process's place among several; None: ``lce.eval.shard.current_shard()``.

    Returns:
        Every finished row of this series in the store, in the order of ``config.tasks``.
    """
    missing = [k for k in META_FIELDS if k not in meta and k != "protocol"]
    check(not missing, "meta", f"missing identity field(s) {', '.join(missing)}")
    store = store if isinstance(store, ResultStore) else ResultStore(store)
    return run_on_main(shard if shard is not None else current_shard(),
                       lambda: _run_missing_tasks(model, tokenizer, config, store, meta, device, backend, progress),
                       "harness")


def _run_missing_tasks(model, tokenizer, config: HarnessConfig, store: ResultStore, meta: dict, device, backend: str,
                       progress: bool) -> list[dict]:
    version, simple_evaluate, TaskManager = import_lm_eval()
    from lce.eval.harness.model import LceLM

    device = torch.device(device) if device is not None else next(model.parameters()).device
    lm = LceLM(pretrained=model, tokenizer=tokenizer, max_length=config.max_length,
               max_gen_toks=config.max_gen_toks, device=str(device), backend=backend)
    runner = PointRunner(store, harness_key, Shard())  # run_on_main: this process alone
    # The harness settings alone: a change to the perplexity protocol (documents, split) must not rerun the tasks.
    protocol = {"harness": {
        "lm_eval": version, "num_fewshot": config.num_fewshot, "limit": config.limit,
        "apply_chat_template": config.apply_chat_template, "metadata": config.metadata, "seed": config.seed,
        "max_gen_toks": config.max_gen_toks}}
    base = {**meta, "protocol": protocol, "kind": KIND, "length": lm.max_length}
    task_manager = None
    for task in tqdm(config.tasks, desc="harness", unit="task", disable=not progress):
        identity = {**base, "task": task}
        if runner.finished(identity) is not None:
            continue
        if task_manager is None:  # only when a task is to run
            task_manager = _task_manager(TaskManager, config)
        run = measure(partial(_evaluate, simple_evaluate, lm, task, task_manager, config), device)
        if run.error is not None:
            measured = {"status": OOM, "results": None, "groups": None, "n_samples": None, "n_shot": None,
                        "error": run.error}
        else:
            measured = {"status": OK, **run.value}
        runner.record(identity, {**measured, "seconds": run.seconds, "peak_mem_mb": run.peak_mem_mb,
                                 "mem_kind": run.mem_kind, "time": utc_now()})
    order = {task: i for i, task in enumerate(config.tasks)}
    return sorted((row for row in runner.series_rows(base, order=lambda r: order.get(r["task"], len(order)))
                   if row["task"] in order), key=lambda r: order[r["task"]])


def _task_manager(TaskManager, config: HarnessConfig):
    """lm-eval's task index: of the include paths alone when they hold every configured task (indexing lm-eval's
    own thousands of task files takes seconds), else of lm-eval's tasks too."""
    metadata = config.metadata or None
    local = TaskManager(include_path=config.include_paths(), include_defaults=False, metadata=metadata)
    if set(config.tasks) <= set(local.all_tasks):
        return local
    return TaskManager(include_path=config.include_paths(), metadata=metadata)


def _evaluate(simple_evaluate, lm, task: str, task_manager, config: HarnessConfig) -> dict:
    limit = config.limit if config.limit is None or config.limit < 1 else int(config.limit)
    out = simple_evaluate(
        model=lm, tasks=[task], num_fewshot=config.num_fewshot, limit=limit, task_manager=task_manager,
        bootstrap_iters=config.bootstrap_iters, log_samples=False, apply_chat_template=config.apply_chat_template,
        metadata=config.metadata or None, random_seed=config.seed, numpy_random_seed=config.seed,
        torch_random_seed=config.seed, fewshot_random_seed=config.seed,
    )
    return {"results": out.get("results"), "groups": out.get("groups"), "n_samples": out.get("n-samples"),
            "n_shot": out.get("n-shot")}
