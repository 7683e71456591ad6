"""The training loop: AdamW on the chunked next-token loss, with accelerate, exact resume and a JSONL step log.

One optimizer step consumes ``grad_accum`` micro-batches per process. The loss is computed from the final hidden
states with ``lce.eval.loss.token_nll`` so full ``[B, T, V]`` logits never exist. Resuming from the newest
checkpoint under ``out_dir`` restores weights, AdamW state, RNG states and the data position; the learning rate is a
pure function of the step (``lce.train.schedule``), so on CPU in fp32 a resumed run repeats the losses of an
uninterrupted one bit for bit.

Runs under ``accelerate launch`` as they are (``conf/accelerate/``): data-parallel (DDP) or fully sharded (FSDP2,
``lce.train.fsdp``), with the losses of one process with the same global batch and checkpoints that resume under
any of them; DeepSpeed ZeRO-3 launches train a DeepSpeed engine lce builds itself (``lce.train.zero3``). With
``train.lora_rank > 0`` the model trains LoRA adapters (``lce.train.lora``) that are merged into its weights when
training ends.

A step whose loss or gradient norm is not finite leaves the weights alone, is logged with ``nonfinite: true`` and is
never checkpointed; ``train.max_nonfinite_steps`` of them in a row stop training (``lce.train.nonfinite``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from lce.config import check
from lce.errors import ConfigError
from lce.eval.loss import token_nll
from lce.hf.adapters import adapter_for
from lce.hf.lm import hidden_states, loss_head
from lce.train import zero3
from lce.train.batch import Batch, block_length, make_batch
from lce.train.checkpoint import (
    checkpoint_dir,
    full_optimizer_state,
    load_optimizer_state,
    load_weights,
    prune,
    read_optimizer_state,
    read_state,
    restore_rng_state,
    save_checkpoint,
)
from lce.train.config import RESUMABLE_CHANGES, TrainConfig
from lce.train.data import TrainBlocks
from lce.train.device import accelerator_cpu, check_device, claimed_device
from lce.train.fsdp import fsdp_settings, gather_parameters, shard
from lce.train.limits import check_positions, resolve_resume
from lce.train.lora import apply_lora, merge_lora
from lce.train.nonfinite import NonFiniteGuard, is_healthy, json_record
from lce.train.schedule import lr_at

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


class NextTokenLoss(nn.Module):
    """A causal LM and its chunked next-token loss as one module.

    accelerate applies autocast and DDP by wrapping a module's ``forward``; computing the loss inside one keeps the
    whole forward (hidden states and chunked logits) under those wrappers.
    """

    def __init__(self, model: nn.Module, chunk_size: int):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token NLL ``[B * T]`` float32 of ``inputs [B, T]`` predicting ``targets [B, T]`` (0 where a target is
        ``IGNORE``), with explicit ``position_ids [B, T]`` and ``attention_mask`` when given (see ``Batch``)."""
        kwargs = {"position_ids": position_ids} if position_ids is not None else {}
        hidden = hidden_states(self.model, inputs, attention_mask, **kwargs)
        return token_nll(
            loss_head(self.model), hidden.flatten(0, 1), targets.flatten(), self.chunk_size
        )


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


@dataclass
class PreparedRun:
    """The model as the loop trains it.

    Attributes:
        loss_module: what forward and backward go through: ``NextTokenLoss`` wrapped by accelerate (DDP, autocast),
            sharded by FSDP2, or a DeepSpeed ZeRO-3 engine around it.
        trained: the module whose parameters the optimizer updates: the caller's model, or its sharded copy.
        optimizer: what the loop steps (accelerate's wrapper without sharding; DeepSpeed's around lce's AdamW).
        sharded: whether ``trained`` is an FSDP2-sharded or ZeRO-3-partitioned copy (then the caller's model
            receives its weights at each checkpoint and at the end).
        group_names: under ZeRO-3, the parameter names of each AdamW group (DeepSpeed's flat partitions replace the
            parameters in the groups); otherwise empty.
    """

    loss_module: nn.Module
    trained: nn.Module
    optimizer: torch.optim.Optimizer
    sharded: bool
    group_names: list[list[str]] = dataclasses.field(default_factory=list)

    @property
    def zero3(self) -> bool:
        """Whether ``loss_module`` is a DeepSpeed ZeRO-3 engine."""
        return zero3.is_engine(self.loss_module)

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer itself (inside accelerate's ``AcceleratedOptimizer`` when there is one)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)


def prepare(accelerator: Accelerator, model: nn.Module, cfg: TrainConfig) -> PreparedRun:
    """Wrap ``model`` and its AdamW for this launch: accelerate's ``prepare`` (one process, DDP), or FSDP2 or
    DeepSpeed ZeRO-3 on a copy when the launch config asks for it (``lce.train.fsdp``, ``lce.train.zero3``; the
    caller's model waits on the CPU meanwhile)."""
    zero3_settings = zero3.zero3_settings(accelerator.mixed_precision)
    if zero3_settings is not None:
        trained = copy.deepcopy(model.cpu())
        optimizer = build_optimizer(trained, cfg)
        names = {id(p): name for name, p in trained.named_parameters()}
        group_names = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        engine = zero3.initialize(NextTokenLoss(trained, cfg.loss_chunk_size), optimizer, cfg, zero3_settings,
                                  trained.config.hidden_size)
        zero3.set_master_weights(engine, trained, model)
        return PreparedRun(engine, trained, engine.optimizer, sharded=True, group_names=group_names)
    settings = fsdp_settings(accelerator, accelerator.mixed_precision)
    if settings is None:
        loss_module, optimizer = accelerator.prepare(NextTokenLoss(model, cfg.loss_chunk_size),
                                                     build_optimizer(model, cfg))
        return PreparedRun(loss_module, model, optimizer, sharded=False)
    trained = copy.deepcopy(model.cpu())
    loss_module = shard(NextTokenLoss(trained, cfg.loss_chunk_size), adapter_for(trained).layers(trained), settings)
    # Built on the sharded parameters, so each process keeps AdamW state for its shards only.
    return PreparedRun(loss_module, trained, build_optimizer(trained, cfg), sharded=True)


def resolve_mixed_precision(mode: str, device: torch.device | None = None) -> str:
    """``auto`` -> ``bf16`` when training on a CUDA device that supports it, else ``no``; other modes pass through.

    ``device`` is the training device from ``lce.train.device.check_device``; None (accelerate's choice) is CUDA
    whenever it is available.
    """
    if mode != "auto":
        return mode
    cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (>= 2-D: linear and embedding weights) only, not on norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


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
            target) is longer than the model's position encoding supports, ``cfg.resume_from`` does not exist, or the
            checkpoint to resume was trained with settings that change the loss trajectory.
        NonFiniteLossError: the loss or gradient norm was not finite for ``cfg.max_nonfinite_steps`` steps in a row,
            or on the last steps of the run; the model then holds the weights of the last finite step (see
            ``lce.train.nonfinite``), and the newest checkpoint is the last good one.
    """
    out_dir = Path(out_dir)
    check_device(device)  # before any work
    run_seed = cfg.seed if cfg.seed is not None else seed
    data = blocks if isinstance(blocks, TrainBlocks) else TrainBlocks(blocks, cfg.micro_batch_size, run_seed)
    check(data.seq_len + 1 == block_length(cfg), "train.seq_len",
          f"is {cfg.seq_len} but the blocks hold {data.seq_len + 1} tokens, not {block_length(cfg)}"
          + (" (PoSE: pose_source_factor x (seq_len + 1))" if cfg.pose_target_len else " (seq_len + 1)"))
    check(data.micro_batch_size == cfg.micro_batch_size, "train.micro_batch_size",
          f"is {cfg.micro_batch_size} but the TrainBlocks serve {data.micro_batch_size}")
    check_positions(model, cfg)
    resume = resolve_resume(out_dir, cfg.resume_from)
    accelerator = fresh_accelerator(cfg, device)
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
    run = prepare(accelerator, model, cfg)

    start_step, data_position, final_loss = 0, 0, None
    if resume is not None:
        state = read_state(resume)
        if run.zero3:
            names = [name for group in run.group_names for name in group]
            zero3.load_optimizer_state(run.loss_module, run.trained, read_optimizer_state(resume, names)["state"])
        else:
            load_optimizer_state(resume, run.trained, run.torch_optimizer)
        restore_rng_state(resume)
        start_step, data_position, final_loss = state["global_step"], state["data_position"], state["extra"].get("loss")
        if accelerator.scaler is not None and "grad_scaler" in state["extra"]:
            accelerator.scaler.load_state_dict(state["extra"]["grad_scaler"])
        if accelerator.is_main_process:
            tqdm.write(f"resumed from step {start_step} ({resume})", file=sys.stderr)  # keeps a progress bar intact
    loss_module, optimizer = run.loss_module, run.optimizer

    log_path = out_dir / LOG_NAME
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        truncate_log(log_path, start_step)

    per_step = cfg.grad_accum * accelerator.num_processes  # global micro-batches per optimizer step
    step_tokens = per_step * cfg.micro_batch_size * cfg.seq_len
    batches = (
        make_batch(rows, index, cfg, model, seed=run_seed, eos_id=eos_id)
        for index, rows in data.indexed_batches(data_position, rank=accelerator.process_index,
                                                num_processes=accelerator.num_processes)
    )
    train_seconds, train_tokens = 0.0, 0
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, resume, loss_scaling=accelerator.scaler is not None)
    checkpoint_due = False  # a checkpoint falls due at a non-finite step: taken at the next finite one instead

    loss_module.train()
    bar = tqdm(total=cfg.steps, initial=min(start_step, cfg.steps), desc="train", dynamic_ncols=True,
               disable=not (progress and accelerator.is_main_process))
    stop = None
    with bar:
        for step in range(start_step + 1, cfg.steps + 1):
            if accelerator.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(accelerator.device)
            started = time.perf_counter()
            lr = lr_at(step, cfg)
            final_loss, grad_norm, applied = optimizer_step(accelerator, loss_module, optimizer, batches, lr, cfg)
            seconds = time.perf_counter() - started
            data_position += per_step
            train_seconds += seconds
            train_tokens += step_tokens

            record = {
                "step": step, "loss": final_loss, "lr": lr, "grad_norm": grad_norm,
                "tokens": data_position * cfg.micro_batch_size * cfg.seq_len,
                "tokens_per_s": step_tokens / seconds, "seconds": seconds, **memory_stats(accelerator.device),
            }
            if val_blocks is not None and cfg.val_every and step % cfg.val_every == 0:
                record["val_loss"] = validation_loss(loss_module, val_blocks, cfg, accelerator.device, model,
                                                     eos_id=eos_id)
            healthy = is_healthy(final_loss, grad_norm, guard.loss_scaling)
            report = step % cfg.log_every == 0 or step == cfg.steps or "val_loss" in record or not healthy
            if accelerator.is_main_process:
                with log_path.open("a") as f:
                    f.write(json.dumps(json_record(record)) + "\n")
                if report and logger is not None:
                    logger.log_metrics(_metric_names(record), step=step)
            if report:
                bar.set_postfix(loss=f"{final_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)

            stop = guard.update(step, final_loss, grad_norm, applied)
            if stop is not None:
                break
            checkpoint_due = checkpoint_due or step % cfg.checkpoint_every == 0 or step == cfg.steps
            if checkpoint_due and healthy:
                guard.saved(_save_checkpoint(accelerator, run, model, out_dir, step, data_position, data, cfg,
                                             {"run": run_info, "loss": final_loss}))
                checkpoint_due = False
    if stop is None and cfg.steps > start_step:
        stop = guard.finish(cfg.steps, final_loss, grad_norm)
    _finish(accelerator, run, model, lora)  # also before a NonFiniteLossError: the weights of the last finite step
    if stop is not None:
        raise stop
    return TrainResult(
        steps=max(start_step, cfg.steps),
        final_loss=final_loss,
        tokens_seen=data_position * cfg.micro_batch_size * cfg.seq_len,
        tokens_per_s=train_tokens / train_seconds if train_seconds else 0.0,
        resumed_from=start_step if resume is not None else None,
        log_path=log_path,
        device=claimed_device(None, accelerator.device),
    )


def _save_checkpoint(accelerator: Accelerator, run: PreparedRun, model: nn.Module, out_dir: Path, step: int,
                     data_position: int, data: TrainBlocks, cfg: TrainConfig, extra: dict[str, Any]) -> Path:
    """Checkpoint step ``step`` from the main process and prune older checkpoints; returns its directory.

    Gathering the state of a sharded model is a collective: every process calls this.
    """
    keeper = model if accelerator.is_main_process else None
    if run.zero3:
        optimizer_state = zero3.full_optimizer_state(run.loss_module, run.trained, run.group_names)
        zero3.gather_parameters(run.loss_module, run.trained, keeper)
    else:
        optimizer_state = full_optimizer_state(run.trained, run.torch_optimizer)
        if run.sharded:
            gather_parameters(run.trained, keeper)
    if accelerator.is_main_process:
        if accelerator.scaler is not None:
            extra = {**extra, "grad_scaler": accelerator.scaler.state_dict()}
        save_checkpoint(
            out_dir, step, model, optimizer_state, data_position=data_position,
            epoch=data_position // data.batches_per_epoch, config=cfg, extra=extra,
        )
        # Steps only grow within a run directory (its own newest checkpoint is always the one resumed), so the
        # checkpoint just written is the newest and survives any keep_checkpoints >= 1.
        prune(out_dir, cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
    return checkpoint_dir(out_dir, step)


def _finish(accelerator: Accelerator, run: PreparedRun, model: nn.Module, lora: Any) -> None:
    """Hand the trained weights back to the caller's ``model`` (a collective when sharded), in eval mode on the
    accelerator's device, LoRA adapters merged."""
    if run.zero3:
        zero3.gather_parameters(run.loss_module, run.trained, model)
        run.loss_module.destroy()  # removes DeepSpeed's hooks from the trained copy, so that it can be freed
    elif run.sharded:
        gather_parameters(run.trained, model)
    if run.sharded:
        model.to(accelerator.device)
    model.eval()
    if lora is not None:
        merge_lora(lora)


def optimizer_step(
    accelerator: Accelerator,
    loss_module: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    lr: float,
    cfg: TrainConfig,
) -> tuple[float, float, bool]:
    """One optimizer step over ``cfg.grad_accum`` micro-batches per process, skipped when it is not finite.

    A step whose loss or gradient norm is not finite (``lce.train.nonfinite.is_healthy``) does not update the weights:
    its gradients are cleared instead (every process decides alike: both values are global). Under ZeRO-3 the engine
    has stepped inside the last micro-batch, skipping a non-finite gradient norm itself (``zero3.step_skipped``).

    Returns:
        ``(loss, grad_norm, applied)``: mean NLL per scored token over every token of the step on all processes, the
        global gradient norm before clipping, and whether the update reached the weights.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    nll_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = 0
    for micro in range(cfg.grad_accum):
        batch = next(batches).to(accelerator.device)
        scored = batch.scored
        if zero3.is_engine(loss_module):
            nll = loss_module(batch.inputs, batch.targets, batch.position_ids, batch.attention_mask)
            # DeepSpeed divides by grad_accum like accelerate, and steps (clipping first) after the last micro-batch.
            loss_module.backward(nll.sum() / max(scored, 1))
            loss_module.step()
            nll_sum += nll.detach().double().sum()
            count += scored
            continue
        if isinstance(loss_module, FSDPModule):
            # Reduce-scatter gradients after the last micro-batch only. accelerate.accumulate does the same when its
            # distributed type is FSDP, which it never is on CPU processes (lce.train.fsdp).
            loss_module.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
        with accelerator.accumulate(loss_module):
            nll = loss_module(batch.inputs, batch.targets, batch.position_ids, batch.attention_mask)
            # accelerate divides by grad_accum: with every token scored, the step's mean over its tokens (packing
            # leaves a few unscored, and then micro-batches weigh by their own scored count).
            accelerator.backward(nll.sum() / max(scored, 1))
        nll_sum += nll.detach().double().sum()
        count += scored
    # Summed over every token of the step and divided once, not a mean of per-micro-batch means.
    total = accelerator.reduce(torch.stack([nll_sum, nll_sum.new_tensor(count)]), "sum")
    loss = (total[0] / total[1]).item()
    if zero3.is_engine(loss_module):
        # Before clipping, over all partitions; inf when DeepSpeed skipped the step.
        return loss, float(loss_module.get_global_grad_norm()), not zero3.step_skipped(loss_module)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # inf: measure the norm, scale by exactly 1
    grad_norm = accelerator.clip_grad_norm_(loss_module.parameters(), max_norm)
    if isinstance(grad_norm, DTensor):  # the norm over sharded gradients, replicated on every process
        grad_norm = grad_norm.full_tensor()
    grad_norm = float(grad_norm)
    applied = is_healthy(loss, grad_norm, loss_scaling=accelerator.scaler is not None)
    if applied:
        optimizer.step()
        # fp16: the GradScaler skips a step whose gradients overflowed (and lowers its scale).
        applied = not getattr(optimizer, "step_was_skipped", False)
    elif accelerator.scaler is not None:
        # clip_grad_norm_ unscaled the gradients for this step; the scaler must close it (lowering its scale when
        # they overflowed) before it unscales the next.
        accelerator.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, applied


def validation_loss(loss_module: nn.Module, val_blocks: torch.Tensor, cfg: TrainConfig, device: torch.device,
                    model: nn.Module, eos_id: int | None = None) -> float:
    """Mean NLL per scored token over the first ``val_batches`` micro-batches of ``val_blocks`` ``[M, S + 1]``
    (packed like the training blocks; PoSE's position skips are not applied)."""
    loss_module.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with torch.no_grad():
        for start in range(0, min(len(val_blocks), cfg.val_batches * cfg.micro_batch_size), cfg.micro_batch_size):
            rows = val_blocks[start : start + cfg.micro_batch_size]
            batch = make_batch(rows, 0, cfg, model, seed=0, eos_id=eos_id, pose=False).to(device)
            total += loss_module(batch.inputs, batch.targets, batch.position_ids, batch.attention_mask).double().sum()
            count += batch.scored
    # FSDP2 keeps the root unit gathered from a forward to its backward; without a backward, shard it again here so
    # that the registered parameters are the optimizer's shards when the next step or checkpoint looks for them.
    for module in loss_module.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    loss_module.train()
    return (total / count).item()


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
    # Checkpoints written before lce recorded micro_batches_per_step compare grad_accum itself, as lce did then.
    legacy = "micro_batches_per_step" not in saved_run
    resumable = RESUMABLE_CHANGES - {"grad_accum"} if legacy else RESUMABLE_CHANGES
    diffs = [
        f"train.{name}: checkpoint {saved_cfg.get(name)!r}, now {value!r}"
        for name, value in dataclasses.asdict(cfg).items()
        if name not in resumable and name != "seed" and saved_cfg.get(name) != value
    ]
    diffs += [
        f"{name}: checkpoint {saved_run.get(name)!r}, now {value!r}"
        for name, value in run_info.items()
        if saved_run.get(name) != value and not (legacy and name == "micro_batches_per_step")
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
