"""One experiment run, callable without Hydra: build a model, patch it, train it short, sweep it long, report.

``run(cfg, out_dir, results_dir)`` takes the composed config (a mapping or OmegaConf node); ``parse_run_config``
turns it into typed configs, rejecting unknown keys at every level. The CLI (``lce.cli``) is a thin Hydra wrapper
around it.

Under ``accelerate launch`` (several processes, ``conf/accelerate/``) every process trains; only the main process
(``RANK`` 0) writes the run config, logs, saves the final model and runs the evaluation sweep.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lce.attention import ATTENTIONS
from lce.config import check, from_mapping, non_default_fields, to_plain, unknown_key
from lce.data import DATASETS, eval_documents, token_stream
from lce.errors import ConfigError
from lce.eval.config import EvalConfig, posenc_label
from lce.eval.protocols import protocol_meta
from lce.eval.shard import current_shard
from lce.eval.sweep import ResultStore, run_sweep
from lce.hf.models import MODELS, save_model
from lce.hf.patch import patch, patch_spec
from lce.kernels.backend import check_backend, use_backend
from lce.loggers import LOGGERS, Run
from lce.posenc import POSENCS
from lce.preflight import DIRECTORY_KEYS, check_directory_name, check_writable_root
from lce.provenance import git_revision, versions
from lce.train import TrainConfig, block_length, check_device, train
from lce.train.data import blocks_from_stream
from lce.train.loop import LOG_NAME

GROUPS = {"model": MODELS, "posenc": POSENCS, "attention": ATTENTIONS, "data": DATASETS, "logger": LOGGERS}

# Sections that define what a run directory holds: re-running into it with any of them changed is an error.
IDENTITY_SECTIONS = ("model", "posenc", "attention", "data", "train", "seed")


@dataclass(frozen=True)
class RunConfig:
    """The whole resolved configuration of one run."""

    model: Any
    posenc: Any
    attention: Any
    data: Any
    train: TrainConfig
    eval: EvalConfig
    logger: Any
    task: Literal["train", "eval", "train_eval"] = "train_eval"
    experiment_name: str = "default"
    run_name: str = "run"
    seed: int = 0
    out_root: str = "outputs"
    device: str = "auto"
    backend: str = "auto"
    threads: int | Literal["auto"] = "auto"

    def __post_init__(self):
        check_backend(self.backend)
        check(self.threads == "auto" or self.threads >= 1, "threads", f"must be auto or >= 1, got {self.threads!r}")
        for key in DIRECTORY_KEYS:
            check_directory_name(key, getattr(self, key))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_run_config(cfg: Any) -> RunConfig:
    """Typed configs from the composed config; every unknown key or bad value is a ``ConfigError`` naming it."""
    data = to_plain(cfg)
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping, got {data!r}")
    allowed = {f.name for f in dataclasses.fields(RunConfig)}
    for key in data:
        if key not in allowed:
            raise unknown_key(key, allowed)
    # train first: the model's fields may be interpolated from it (tiny_llama's max_position_embeddings is
    # ${train.seq_len}), and a bad value must be blamed on the key the user set.
    built: dict[str, Any] = {"train": from_mapping(TrainConfig, data.get("train"), "train")}
    for name, registry in GROUPS.items():
        spec = data.get(name, {"name": "none"} if name == "logger" else None)
        if spec is None:
            raise ConfigError(f"{name}: required; available: {', '.join(registry.names())}")
        built[name] = registry.build(spec, name)
    built["eval"] = from_mapping(EvalConfig, data.get("eval"), "eval")
    scalars = {k: v for k, v in data.items() if k not in built}
    return from_mapping(RunConfig, {**scalars, **built}, "config")


def _guard_run_dir(out_dir: Path, run_cfg: RunConfig) -> None:
    """Refuse to resume a run directory that holds a different run (it would mix two runs' checkpoints)."""
    path = out_dir / "run_config.json"
    current = {k: run_cfg.to_dict()[k] for k in IDENTITY_SECTIONS}
    if path.is_file():
        saved = json.loads(path.read_text())
        diffs = [k for k in IDENTITY_SECTIONS if saved.get(k) != json.loads(json.dumps(current[k]))]
        if diffs:
            raise ConfigError(
                f"run_name: {out_dir} already holds run {run_cfg.run_name!r} with a different {', '.join(diffs)} "
                f"configuration; choose another run_name (or delete that directory) instead of mixing two runs"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=2, sort_keys=True))


def process_device(device: str) -> torch.device:
    """This process's device, checked to exist on this machine (``lce.train.check_device``): ``auto`` is the GPU of
    its local rank under ``accelerate launch``/``torchrun`` (``LOCAL_RANK``), else the current GPU, else the CPU."""
    checked = check_device(device)
    if checked is not None:
        return checked
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))


def is_main_process() -> bool:
    """Whether this is the main process of an ``accelerate launch``/``torchrun`` job (or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0


def _label(config) -> dict:
    return {"name": config.name, **non_default_fields(config)}


def run(cfg: Any, out_dir: str | Path, results_dir: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Run the configured task; returns the sweep rows of this run (empty for ``task=train``).

    Args:
        cfg: the composed config (see ``conf/config.yaml``).
        out_dir: this run's directory (checkpoints, final model, train log).
        results_dir: where ``results.jsonl`` and the report are written; shared by all runs of an experiment so
            that its table and plot compare them. Defaults to ``out_dir``.
    """
    run_cfg = cfg if isinstance(cfg, RunConfig) else parse_run_config(cfg)
    out_dir = Path(out_dir)
    results_dir = Path(results_dir) if results_dir is not None else out_dir
    main = is_main_process()
    device = process_device(run_cfg.device)
    if main:  # where the work will go, before any work
        check_writable_root(str(out_dir))
        if run_cfg.task != "train":
            result_files = ["results.jsonl", *(["retrieval.jsonl"] if run_cfg.eval.retrieval else []),
                            *(["harness.jsonl"] if run_cfg.eval.harness else [])]
            for name in result_files:
                ResultStore(results_dir / name).check_writable()
        if run_cfg.task != "train" and run_cfg.eval.harness is not None:
            from lce.eval.harness import require_lm_eval

            require_lm_eval()
        _guard_run_dir(out_dir, run_cfg)
    torch.manual_seed(run_cfg.seed)
    logger = run_cfg.logger.start(run_cfg.to_dict(), run_cfg.run_name, out_dir) if main else Run()
    try:
        model, tokenizer = run_cfg.model.load(seed=run_cfg.seed)
        if tokenizer is None:
            raise ConfigError(f"model.tokenizer: the model at {getattr(run_cfg.model, 'path', run_cfg.model.name)!r} "
                              f"holds no tokenizer, and lce needs one to read data={run_cfg.data.name}; set "
                              "model.tokenizer=<local directory or hub id>")
        set_threads(run_cfg.threads, model, device)
        trained = trained_posenc(run_cfg, patch_spec(model))
        for i, spec in enumerate(run_cfg.eval.posencs):  # before training: a refusal must not cost a run
            _check_signal(trained, posenc_label(spec)[0], f"eval.posencs[{i}]", run_cfg.eval.allow_other_signals)
        patch(model, run_cfg.posenc, attention=run_cfg.attention)
        outputs: dict[str, list[Path]] = {}
        # The whole run, backward passes included, on one backend (activation checkpointing recomputes forwards).
        with use_backend(run_cfg.backend):
            if run_cfg.task in ("train", "train_eval"):
                model = _train(run_cfg, model, tokenizer, out_dir, logger, device, progress)
                outputs["model"] = [out_dir / "model"]
                outputs["training log"] = [out_dir / LOG_NAME]
            # Every process evaluates: the sweep shards its forward passes and only the main process writes.
            rows = (_sweep(run_cfg, model, tokenizer, results_dir, logger, device, trained, outputs, progress)
                    if run_cfg.task != "train" else [])
    finally:
        logger.finish()
    if main and progress:
        from lce.eval.report import print_outputs

        print_outputs(outputs)
    return rows if main else []


#: Below this many parameters ``threads=auto`` trains and evaluates on one CPU thread: the operations are too small to
#: split across cores (measured on 2 cores, the quickstart's 0.8M-parameter Llama trained faster on one thread than on
#: two sleeping ones, idle or beside a busy process, and two spinning ones lost to one as soon as another process ran:
#: experiments/results/threads/).
ONE_THREAD_PARAMS = 2_000_000


def set_threads(threads: int | str, model, device: torch.device) -> None:
    """torch's intra-op CPU threads for this run: ``threads`` when set; for ``auto``, one thread for a CPU model of
    fewer than ``ONE_THREAD_PARAMS`` parameters (unless ``OMP_NUM_THREADS`` says otherwise), else torch's default."""
    if threads != "auto":
        torch.set_num_threads(threads)
    elif device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and (
            sum(p.numel() for p in model.parameters()) < ONE_THREAD_PARAMS):
        torch.set_num_threads(1)


def trained_posenc(run_cfg: RunConfig, saved: dict | None):
    """The position encoding the evaluated model's weights were trained with: the run's own when it trains, else the
    one its checkpoint records (``config.lce``), else the run's.

    Raises:
        ConfigError: an evaluation-only run gives a checkpoint another kind of position signal than it was trained
            with (``PosEnc.signal``), and ``eval.allow_other_signals`` is off.
    """
    if run_cfg.task != "eval" or saved is None:
        return run_cfg.posenc
    trained = POSENCS.build(saved["posenc"], "config.lce.posenc")
    if dataclasses.asdict(trained) != dataclasses.asdict(run_cfg.posenc):
        _check_signal(trained, run_cfg.posenc, "posenc", run_cfg.eval.allow_other_signals)
        warnings.warn(f"the checkpoint was trained with posenc {_label(trained)}; it is evaluated with "
                      f"{_label(run_cfg.posenc)}")
    return trained


def _check_signal(trained, evaluated, where: str, allowed: bool) -> None:
    """Refuse to evaluate a model under another kind of position signal than it learned (ALiBi weights under RoPE)."""
    if trained.signal != evaluated.signal and not allowed:
        raise ConfigError(
            f"{where}: {evaluated.name} gives the model {evaluated.signal} positions, but it was trained with "
            f"{trained.name} ({trained.signal} positions), so the evaluation would measure a broken model; use "
            f"methods of its kind, or set eval.allow_other_signals=true for such an ablation"
        )


def _train(run_cfg: RunConfig, model, tokenizer, out_dir: Path, logger, device: torch.device, progress: bool):
    """Train (LoRA adapters come back merged), then save the final model from the main process."""
    seq_len = run_cfg.train.seq_len
    blocks = blocks_from_stream(token_stream(run_cfg.data, tokenizer, "train"), block_length(run_cfg.train) - 1)
    val = token_stream(run_cfg.data, tokenizer, "validation") if run_cfg.train.val_every > 0 else None
    val_blocks = blocks_from_stream(val, seq_len) if val is not None else None
    train(model, blocks, run_cfg.train, out_dir, val_blocks=val_blocks, logger=logger, seed=run_cfg.seed,
          eos_id=tokenizer.eos_id, progress=progress, device=device)
    if is_main_process():
        save_model(model, tokenizer, out_dir / "model")
    return model


def _sweep(run_cfg: RunConfig, model, tokenizer, results_dir: Path, logger, device: torch.device, trained,
           outputs: dict[str, list[Path]], progress: bool) -> list[dict]:
    """Perplexity vs length (and retrieval, when configured) of each evaluated series; then the report. The files
    written are added to ``outputs``."""
    from lce.eval.compare import report_outputs

    ev = run_cfg.eval
    lengths = list(ev.lengths)
    train_length = run_cfg.train.seq_len
    protocol = ev.protocol.with_bucket_size(ev.bucket_size or train_length)
    if protocol.input == "documents":
        data = eval_documents(run_cfg.data, tokenizer, ev.min_doc_tokens or max(lengths), ev.n_docs, ev.split,
                              ev.documents)
    else:
        data = token_stream(run_cfg.data, tokenizer, ev.split)
    model.to(device)
    meta = {
        "experiment": run_cfg.experiment_name,
        "run_name": run_cfg.run_name,
        "model": _label(run_cfg.model),
        "trained_posenc": _label(trained),
        "seed": run_cfg.seed,
        "protocol": {**protocol_meta(protocol), "data": run_cfg.data.name, "split": ev.split,
                     "n_docs": ev.n_docs, "documents": ev.documents},
        "train_length": train_length,
        "git_revision": git_revision(),
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "config": run_cfg.to_dict(),
    }
    store = ResultStore(results_dir / "results.jsonl")
    series = [(run_cfg.run_name, run_cfg.posenc)]
    if ev.posencs:
        series = [(label, config) for config, label in
                  (posenc_label(spec, f"eval.posencs[{i}]") for i, spec in enumerate(ev.posencs))]
    rows = []
    for run, posenc in series:
        if ev.posencs:
            patch(model, posenc, attention=run_cfg.attention)
        identity = {"run": run, "method": posenc.name,
                    "params": {"posenc": _label(posenc), "attention": _label(run_cfg.attention)}}
        rows += run_sweep(model, data, lengths, store, meta={**meta, **identity}, protocol=protocol,
                          bos_id=tokenizer.bos_id, batch_size=ev.batch_size, chunk_size=ev.loss_chunk_size,
                          device=device, progress=progress)
        _retrieval(run_cfg, model, tokenizer, results_dir, {**meta, **identity}, device, progress)
        if ev.harness is not None:
            from lce.eval.harness import run_harness

            run_harness(model, tokenizer, ev.harness, results_dir / "harness.jsonl", meta={**meta, **identity},
                        device=device, backend=run_cfg.backend, progress=progress)
    if not current_shard().is_main:
        return rows
    outputs["results"] = [store.path, *([results_dir / "retrieval.jsonl"] if ev.retrieval else []),
                          *([results_dir / "harness.jsonl"] if ev.harness is not None else [])]
    paths = report_experiment(results_dir, run_cfg.experiment_name, train_length)
    logger.log_sweep(rows, paths.get("ppl_png"))
    outputs.update(report_outputs(paths))
    return rows


def report_experiment(results_dir: Path, experiment: str, train_length: int) -> dict[str, Path]:
    """The end of a sweep's report of ``experiment``: what ``lce report <results_dir> --out <results_dir>`` prints
    and writes, by the same code (``lce.eval.compare.report``). Returns the paths written by kind."""
    from lce.eval.compare import report, selected_rows

    return report(selected_rows([results_dir], [experiment]), results_dir, train_length=train_length)


def _retrieval(run_cfg: RunConfig, model, tokenizer, results_dir: Path, meta: dict, device, progress: bool) -> None:
    """Run each configured retrieval task on the current series (its heatmaps are drawn by the report)."""
    from lce.eval.retrieval import corpus_text, model_generate_fn, run_retrieval

    ev = run_cfg.eval
    for task in ev.retrieval.values():
        haystack = corpus_text(run_cfg.data, tokenizer, max(task.lengths), ev.split) if task.needs_corpus else None
        run_retrieval(model_generate_fn(model, tokenizer.eos_id, device), tokenizer, task,
                      results_dir / "retrieval.jsonl", haystack_text=haystack, bos_id=tokenizer.bos_id,
                      meta={**meta, "protocol": {"data": run_cfg.data.name, "split": ev.split}}, device=device,
                      progress=progress)
