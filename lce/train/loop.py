"""The training loop: AdamW on the chunked next-token loss, with accelerate, exact resume and a JSONL step log.

One optimizer step consumes ``grad_accum`` micro-batches per process. The loss is computed from the final hidden
states with ``lce.eval.loss.token_nll`` (``lce.train.objective``) so full ``[B, T, V]`` logits never exist. Resuming
from the newest checkpoint under ``out_dir`` restores weights, AdamW state, RNG states and the data position; the
learning rate is a pure function of the step (``lce.train.schedule``), so on CPU in fp32 a resumed run repeats the
losses of an uninterrupted one bit for bit.

Runs under ``accelerate launch`` as they are (``conf/accelerate/``): data-parallel (DDP), fully sharded (FSDP2,
``lce.train.fsdp``) or DeepSpeed ZeRO-3 (an engine lce builds itself, ``lce.train.zero3``), with the losses of one
process with the same global batch and checkpoints that resume under any of them. The launch picks a training
strategy once (``lce.train.strategy``); this loop is the same for all of them. With
``train.lora_rank > 0`` the model trains LoRA adapters (``lce.train.lora``) that are merged into its weights when
training ends.

A step whose loss or gradient norm is not finite leaves the weights alone, is logged with ``nonfinite: true`` and is
never checkpointed; ``train.max_nonfinite_steps`` of them in a row stop training (``lce.train.nonfinite``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from lce.config import check
from lce.errors import ConfigError
from lce.train import zero3
from lce.train.batch import Batch, block_length, make_batch
from lce.train.checkpoint import checkpoint_dir, load_weights, prune, read_state, restore_rng_state, save_checkpoint
from lce.train.config import RESUMABLE_CHANGES, TrainConfig
from lce.train.data import TrainBlocks
from lce.train.device import accelerator_cpu, check_device, claimed_device
from lce.train.limits import check_positions, resolve_resume
from lce.train.lora import apply_lora, merge_lora
from lce.train.nonfinite import NonFiniteGuard, is_healthy, json_record
from lce.train.schedule import lr_at
from lce.train.strategy import TrainingStrategy, select_strategy

LOG_NAME = "train_log.jsonl"


@dataclass
class TrainResult:
    """What a call to ``train`` did.

    Attributes:
        steps: global optimizer steps the model has now taken (including those before a resume).
        final_loss: training loss of the last step (from the checkpoint if no step ran in this call).
        tokens_seen: training tokens consumed by all processes over the whole run.
        tokens_per_s: training throughput of this call (all processes; validation and saving excluded).
        resumed_from: the global step this call resumed from, or None for a fresh start.
        log_path: the JSONL step log.
        device: the device this process trained on (a CUDA device with its index).
    """

    steps: int
    final_loss: float | None
    tokens_seen: int
    tokens_per_s: float
    resumed_from: int | None
    log_path: Path
    device: torch.device


def fresh_accelerator(cfg: TrainConfig, device: torch.device | str | None = None) -> Accelerator:
    """An ``Accelerator`` configured by ``cfg`` on ``device``, independent of any created earlier in this process.

    Hydra's basic launcher runs multirun jobs one after another in one process; accelerate keeps its state in
    process-wide singletons, which would otherwise keep the first job's mixed precision (and raise when a later job
    asks for another) and could carry a half-finished gradient accumulation over from an interrupted run.

    Args:
        cfg: training config.
        device: see ``lce.train.device.check_device``; None is accelerate's choice.

    Raises:
        ConfigError: ``device`` does not exist here, or the DeepSpeed launch config is not one lce runs.
    """
    target = check_device(device)
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision, target)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    zero3.zero3_settings(mixed_precision)  # a bad DeepSpeed launch fails before any setup
    zero3.quiet_cpu_detection()  # before anything imports deepspeed
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        cpu=accelerator_cpu(target),
    )
    claimed_device(target, accelerator.device)
    return accelerator


def resolve_mixed_precision(mode: str, device: torch.device | None = None) -> str:
    """``auto`` -> ``bf16`` when training on a CUDA device that supports it, else ``no``; other modes pass through.

    ``device`` is the training device from ``lce.train.device.check_device``; None (accelerate's choice) is CUDA
    whenever it is available.
    """
    if mode != "auto":
        return mode
    cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations.

    transformers 5.23 deprecates ``gradient_checkpointing_enable`` (removed in v6) in favour of
    ``activation_checkpointing_enable``; the old name is used only on versions without the new one.
    """
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation


def train(
    model: nn.Module,
    blocks: TrainBlocks | torch.Tensor,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    val_blocks: torch.Tensor | None = None,
    logger: Any = None,
    seed: int = 0,
    eos_id: int | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> TrainResult:
    """Train ``model`` in place up to ``cfg.steps`` optimizer steps, resuming from ``out_dir`` when possible.

    Args:
        model: a causal LM supported by ``lce.hf.adapters``; left in eval mode on the accelerator's device (with
            LoRA, its adapters merged into its weights: the same object, a plain transformers model again).
        blocks: training blocks ``[N, block_length(cfg)]`` (``seq_len + 1`` tokens, or PoSE's source windows),
            ordered with the run seed, or a ready ``TrainBlocks``.
        cfg: training config.
        out_dir: run directory for ``checkpoints/`` and ``train_log.jsonl``; its newest checkpoint is resumed.
        val_blocks: ``[M, S + 1]`` validation blocks; the first ``val_batches`` micro-batches are scored.
        logger: anything with ``log_metrics(metrics: dict, step: int)``; called every ``log_every`` steps, at the
            last step and with each validation loss.
        seed: run seed, used when ``cfg.seed`` is None.
        eos_id: the token that ends each document in the stream (needed by ``cfg.pack_documents``).
        progress: show a progress bar.
        device: the device to train on: ``cpu``, ``cuda`` or ``cuda:N`` (under a multi-process launch each process
            trains on its ``LOCAL_RANK`` GPU); None is accelerate's choice (see ``lce.train.device.check_device``).

    Raises:
        ConfigError: if ``device`` does not exist here, the blocks do not match ``cfg``, ``cfg.seq_len`` (or PoSE's
            target) is longer than the model's position encoding supports, ``cfg.resume_from`` does not exist, the
            checkpoint to resume was trained with settings that change the loss trajectory, or the launch config asks
            for what lce does not do (``lce.train.strategy.launch_strategy``).
        NonFiniteLossError: the loss or gradient norm was not finite for ``cfg.max_nonfinite_steps`` steps in a row,
            or on the last steps of the run; the model then holds the weights of the last finite step (see
            ``lce.train.nonfinite``), and the newest checkpoint is the last good one.
    """
    out_dir = Path(out_dir)
    check_device(device)  # before any work
    run_seed = cfg.seed if cfg.seed is not None else seed
    data = training_blocks(blocks, cfg, run_seed)
    check_positions(model, cfg)
    resume = resolve_resume(out_dir, cfg.resume_from)
    accelerator = fresh_accelerator(cfg, device)
    strategy = select_strategy(accelerator, cfg)
    run_info = {"seed": run_seed, "data_seed": data.seed, "num_blocks": len(data),
                "micro_batches_per_step": cfg.grad_accum * accelerator.num_processes}
    if resume is not None:
        check_resumable(read_state(resume), cfg, run_info, resume)
    set_seed(run_seed)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    lora = apply_lora(model, cfg) if cfg.lora_rank else None
    if resume is not None:
        load_weights(resume, model)
    strategy.prepare(model)
    done = resume_progress(resume, strategy) if resume is not None else Progress()
    start_step = done.step
    batches = (
        make_batch(rows, index, cfg, model, seed=run_seed, eos_id=eos_id)
        for index, rows in data.indexed_batches(done.data_position, rank=accelerator.process_index,
                                                num_processes=accelerator.num_processes)
    )
    validate = None if val_blocks is None else (lambda: validation_loss(strategy, val_blocks, cfg, model, eos_id))
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, resume, loss_scaling=accelerator.scaler is not None)
    checkpoint_due = False  # a checkpoint falls due at a non-finite step: taken at the next finite one instead
    stop = None
    strategy.loss_module.train()
    with StepLog.open(out_dir, start_step, cfg.steps, logger, accelerator.is_main_process, progress) as log:
        for step in range(start_step + 1, cfg.steps + 1):
            record, applied = train_step(step, strategy, batches, done, validate)
            healthy = is_healthy(done.loss, done.grad_norm, guard.loss_scaling)
            log.write(record, report=step % cfg.log_every == 0 or step == cfg.steps or "val_loss" in record
                      or not healthy)
            stop = guard.update(step, done.loss, done.grad_norm, applied)
            if stop is not None:
                break
            checkpoint_due = checkpoint_due or step % cfg.checkpoint_every == 0 or step == cfg.steps
            if checkpoint_due and healthy:
                guard.saved(save_progress(strategy, model, out_dir, done, data, run_info))
                checkpoint_due = False
    if stop is None and cfg.steps > start_step:
        stop = guard.finish(cfg.steps, done.loss, done.grad_norm)
    strategy.finish(model)  # also before a NonFiniteLossError: the weights of the last finite step
    model.eval()
    if lora is not None:
        merge_lora(lora)
    if stop is not None:
        raise stop
    return TrainResult(
        steps=max(start_step, cfg.steps),
        final_loss=done.loss,
        tokens_seen=done.tokens_seen(cfg),
        tokens_per_s=done.train_tokens / done.train_seconds if done.train_seconds else 0.0,
        resumed_from=start_step if resume is not None else None,
        log_path=out_dir / LOG_NAME,
        device=claimed_device(None, accelerator.device),
    )


def training_blocks(blocks: TrainBlocks | torch.Tensor, cfg: TrainConfig, run_seed: int) -> TrainBlocks:
    """``blocks`` as ``TrainBlocks`` (ordered with ``run_seed``), checked to match ``cfg``."""
    data = blocks if isinstance(blocks, TrainBlocks) else TrainBlocks(blocks, cfg.micro_batch_size, run_seed)
    check(data.seq_len + 1 == block_length(cfg), "train.seq_len",
          f"is {cfg.seq_len} but the blocks hold {data.seq_len + 1} tokens, not {block_length(cfg)}"
          + (" (PoSE: pose_source_factor x (seq_len + 1))" if cfg.pose_target_len else " (seq_len + 1)"))
    check(data.micro_batch_size == cfg.micro_batch_size, "train.micro_batch_size",
          f"is {cfg.micro_batch_size} but the TrainBlocks serve {data.micro_batch_size}")
    return data


@dataclass
class Progress:
    """Where a run stands after its last optimizer step.

    Attributes:
        step: global optimizer steps taken.
        data_position: global micro-batches consumed (where the data order resumes).
        loss: the last step's training loss (from the checkpoint until a step runs).
        grad_norm: the last step's global gradient norm before clipping (None until a step runs in this call).
        train_seconds: time spent in optimizer steps in this call (validation and saving excluded).
        train_tokens: training tokens of all processes in this call.
    """

    step: int = 0
    data_position: int = 0
    loss: float | None = None
    grad_norm: float | None = None
    train_seconds: float = 0.0
    train_tokens: int = 0

    def tokens_seen(self, cfg: TrainConfig) -> int:
        """Training tokens consumed by all processes over the whole run."""
        return self.data_position * cfg.micro_batch_size * cfg.seq_len


def resume_progress(path: Path, strategy: TrainingStrategy) -> Progress:
    """Restore the optimizer state, RNG states and gradient scaler of checkpoint ``path`` (into a prepared
    ``strategy``; the weights are loaded before it is prepared); returns where the checkpoint stood."""
    state = read_state(path)
    strategy.load_optimizer_state(path)
    restore_rng_state(path)
    scaler = strategy.accelerator.scaler
    if scaler is not None and "grad_scaler" in state["extra"]:
        scaler.load_state_dict(state["extra"]["grad_scaler"])
    if strategy.accelerator.is_main_process:
        # tqdm.write keeps a progress bar intact.
        tqdm.write(f"resumed from step {state['global_step']} ({path})", file=sys.stderr)
    return Progress(step=state["global_step"], data_position=state["data_position"], loss=state["extra"].get("loss"))


def train_step(step: int, strategy: TrainingStrategy, batches: Iterator[Batch], done: Progress,
               validate: Callable[[], float] | None) -> tuple[dict[str, Any], bool]:
    """Take optimizer step ``step`` and advance ``done`` past it.

    Returns:
        ``(record, applied)``: the step's log record (with ``val_loss`` when validation falls due and ``validate``
        is given), and whether its update reached the weights.
    """
    cfg, device = strategy.cfg, strategy.accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    lr = lr_at(step, cfg)
    done.loss, done.grad_norm, applied = optimizer_step(strategy, batches, lr)
    seconds = time.perf_counter() - started
    per_step = cfg.grad_accum * strategy.accelerator.num_processes  # global micro-batches per optimizer step
    step_tokens = per_step * cfg.micro_batch_size * cfg.seq_len
    done.step = step
    done.data_position += per_step
    done.train_seconds += seconds
    done.train_tokens += step_tokens
    record = {
        "step": step, "loss": done.loss, "lr": lr, "grad_norm": done.grad_norm, "tokens": done.tokens_seen(cfg),
        "tokens_per_s": step_tokens / seconds, "seconds": seconds, **memory_stats(device),
    }
    if validate is not None and cfg.val_every and step % cfg.val_every == 0:
        record["val_loss"] = validate()
    return record, applied


def optimizer_step(strategy: TrainingStrategy, batches: Iterator[Batch], lr: float) -> tuple[float, float, bool]:
    """One optimizer step over ``grad_accum`` micro-batches per process, skipped when it is not finite
    (``TrainingStrategy.update``).

    Returns:
        ``(loss, grad_norm, applied)``: mean NLL per scored token over every token of the step on all processes, the
        global gradient norm before clipping, and whether the update reached the weights.
    """
    accelerator, grad_accum = strategy.accelerator, strategy.cfg.grad_accum
    for group in strategy.optimizer.param_groups:
        group["lr"] = lr
    nll_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = 0
    for micro in range(grad_accum):
        batch = next(batches).to(accelerator.device)
        nll = strategy.forward_backward(batch, last=micro == grad_accum - 1)
        nll_sum += nll.detach().double().sum()
        count += batch.scored
    # Summed over every token of the step and divided once, not a mean of per-micro-batch means.
    total = accelerator.reduce(torch.stack([nll_sum, nll_sum.new_tensor(count)]), "sum")
    loss = (total[0] / total[1]).item()
    return (loss, *strategy.update(loss))


def validation_loss(strategy: TrainingStrategy, val_blocks: torch.Tensor, cfg: TrainConfig, model: nn.Module,
                    eos_id: int | None = None) -> float:
    """Mean NLL per scored token over the first ``val_batches`` micro-batches of ``val_blocks`` ``[M, S + 1]``
    (packed like the training blocks; PoSE's position skips are not applied)."""
    device = strategy.accelerator.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with strategy.evaluating() as loss_module, torch.no_grad():
        for start in range(0, min(len(val_blocks), cfg.val_batches * cfg.micro_batch_size), cfg.micro_batch_size):
            rows = val_blocks[start : start + cfg.micro_batch_size]
            batch = make_batch(rows, 0, cfg, model, seed=0, eos_id=eos_id, pose=False).to(device)
            total += loss_module(batch.inputs, batch.targets, batch.position_ids, batch.attention_mask).double().sum()
            count += batch.scored
    return (total / count).item()


def save_progress(strategy: TrainingStrategy, model: nn.Module, out_dir: Path, done: Progress, data: TrainBlocks,
                  run_info: dict[str, Any]) -> Path:
    """Checkpoint step ``done.step`` from the main process and prune older checkpoints; returns its directory.

    Gathering the state of a sharded model is a collective: every process calls this.
    """
    accelerator, cfg = strategy.accelerator, strategy.cfg
    optimizer_state = strategy.optimizer_state()
    strategy.gather_into(model if accelerator.is_main_process else None)
    if accelerator.is_main_process:
        extra = {"run": run_info, "loss": done.loss}
        if accelerator.scaler is not None:
            extra["grad_scaler"] = accelerator.scaler.state_dict()
        save_checkpoint(
            out_dir, done.step, model, optimizer_state, data_position=done.data_position,
            epoch=done.data_position // data.batches_per_epoch, config=cfg, extra=extra,
        )
        # Steps only grow within a run directory (its own newest checkpoint is always the one resumed), so the
        # checkpoint just written is the newest and survives any keep_checkpoints >= 1.
        prune(out_dir, cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
    return checkpoint_dir(out_dir, done.step)


@dataclass
class StepLog:
    """Where each step's record goes: the JSONL log and the logger (from the main process only), and the progress
    bar."""

    path: Path
    logger: Any
    main_process: bool
    bar: tqdm

    @classmethod
    @contextmanager
    def open(cls, out_dir: Path, start_step: int, steps: int, logger: Any, main_process: bool,
             progress: bool) -> Iterator[StepLog]:
        """The log of a run resumed after ``start_step`` (0: a fresh one) of ``steps``: lines of later steps are
        dropped from ``out_dir/train_log.jsonl``; the progress bar (when ``progress``) closes on exit."""
        path = out_dir / LOG_NAME
        if main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            truncate_log(path, start_step)
        with tqdm(total=steps, initial=min(start_step, steps), desc="train", dynamic_ncols=True,
                  disable=not (progress and main_process)) as bar:
            yield cls(path, logger, main_process, bar)

    def write(self, record: dict[str, Any], report: bool) -> None:
        """Append ``record`` to the JSONL log; when ``report``, also to the logger and the progress bar."""
        if self.main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(json_record(record)) + "\n")
            if report and self.logger is not None:
                self.logger.log_metrics(_metric_names(record), step=record["step"])
        if report:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
        self.bar.update(1)


def memory_stats(device: torch.device) -> dict[str, float]:
    """Memory of the step: ``peak_mem_mb`` (CUDA memory allocated by torch at its peak, on a CUDA device) and
    ``max_rss_mb`` (the process's peak resident set size so far, on any device)."""
    stats = {}
    if device.type == "cuda":
        stats["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats["max_rss_mb"] = rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    return stats


def check_resumable(state: dict[str, Any], cfg: TrainConfig, run_info: dict[str, Any], path: Path) -> None:
    """Raise ConfigError naming every setting that differs from checkpoint ``path`` and changes the trajectory.

    ``cfg.seed`` itself is not compared: the effective seeds and the data are, through ``run_info``
    (``seed``, ``data_seed``, ``num_blocks``). Nor is ``cfg.grad_accum``: the global batch is
    (``micro_batches_per_step``, ``grad_accum`` x processes), so a run may resume on another number of processes.
    """
    saved_cfg, saved_run = state["config"], state["extra"].get("run", {})
    diffs = [
        f"train.{name}: checkpoint {saved_cfg.get(name)!r}, now {value!r}"
        for name, value in dataclasses.asdict(cfg).items()
        if name not in RESUMABLE_CHANGES and name != "seed" and saved_cfg.get(name) != value
    ]
    diffs += [
        f"{name}: checkpoint {saved_run.get(name)!r}, now {value!r}"
        for name, value in run_info.items()
        if saved_run.get(name) != value
    ]
    if diffs:
        raise ConfigError(
            f"train: cannot resume from {path}: it was trained with different settings ({'; '.join(diffs)}); "
            f"restore them or use a new output directory"
        )


def truncate_log(path: Path, step: int) -> None:
    """Keep only the lines of steps <= ``step``: later ones were logged after the checkpoint being resumed."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a kill mid-write leaves a torn last line
        if record["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _metric_names(record: dict[str, Any]) -> dict[str, Any]:
    """A step record as logger metrics: ``train/<key>``, and ``val/loss`` for the validation loss."""
    return {("val/loss" if key == "val_loss" else f"train/{key}"): value for key, value in record.items()
            if key != "step"}
