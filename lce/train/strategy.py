"""How a launch trains: one process, data parallel (DDP), FSDP2 or DeepSpeed ZeRO-3, one small class each.

``select_strategy`` reads the launch once (what ``accelerate launch`` put into the environment, and the accelerator)
and builds the class ``STRATEGIES`` names for it. The training loop (``lce.train.loop``) then calls the same
operations whatever the launch:

* ``prepare``: the model and its AdamW (``lce.train.objective``) as this launch trains them;
* ``forward_backward`` for each micro-batch and ``update`` once per optimizer step;
* ``evaluating`` around forward passes without a backward (validation);
* ``optimizer_state`` and ``gather_into`` for a checkpoint, ``load_optimizer_state`` on resume;
* ``finish``: the caller's model receives the trained weights.

Every strategy writes and reads the same checkpoints (full tensors by parameter name, ``lce.train.checkpoint``), so a
run resumes under any of them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from lce.errors import ConfigError
from lce.hf.adapters import adapter_for
from lce.train import fsdp, zero3
from lce.train.batch import Batch
from lce.train.checkpoint import full_optimizer_state, load_optimizer_state, read_optimizer_state
from lce.train.config import TrainConfig
from lce.train.nonfinite import is_healthy
from lce.train.objective import NextTokenLoss, build_optimizer


class TrainingStrategy:
    """One way to train; the operations default to accelerate's, which one process, DDP and FSDP2 share.

    Attributes:
        accelerator: this run's accelerator.
        cfg: training config.
        settings: what the launch config asks of this strategy (``FsdpSettings``, ``Zero3Settings``), or None.
        loss_module: what forward and backward go through (set by ``prepare``).
        trained: the module whose parameters the optimizer updates: the caller's model, or a sharded copy of it.
        optimizer: what ``update`` steps; the loop sets the learning rate on its ``param_groups``.
    """

    name: ClassVar[str]

    def __init__(self, accelerator: Accelerator, cfg: TrainConfig, settings: Any = None):
        self.accelerator = accelerator
        self.cfg = cfg
        self.settings = settings
        self.loss_module: nn.Module
        self.trained: nn.Module
        self.optimizer: torch.optim.Optimizer

    def prepare(self, model: nn.Module) -> None:
        """Set up ``loss_module``, ``trained`` and ``optimizer`` around the caller's ``model``."""
        raise NotImplementedError

    def forward_backward(self, batch: Batch, last: bool) -> torch.Tensor:
        """The per-token NLL ``[B * T]`` of ``batch`` (on the accelerator's device), its gradients accumulated.

        Args:
            batch: one micro-batch.
            last: whether it is the optimizer step's last micro-batch.
        """
        with self.accelerator.accumulate(self.loss_module):
            nll = self.loss_module(batch.inputs, batch.targets, batch.position_ids, batch.attention_mask)
            # accelerate divides by grad_accum: with every token scored, the step's mean over its tokens (packing
            # leaves a few unscored, and then micro-batches weigh by their own scored count).
            self.accelerator.backward(nll.sum() / max(batch.scored, 1))
        return nll

    def update(self, loss: float) -> tuple[float, bool]:
        """Clip the accumulated gradients and step, unless ``loss`` (the step's global loss) or the gradient norm is
        not finite (``lce.train.nonfinite.is_healthy``): then the gradients are cleared instead (every process decides
        alike: both values are global).

        Returns:
            ``(grad_norm, applied)``: the global gradient norm before clipping, and whether the update reached the
            weights.
        """
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf  # inf: measure, scale by exactly 1
        grad_norm = self.clip_gradients(max_norm)
        scaler = self.accelerator.scaler
        applied = is_healthy(loss, grad_norm, loss_scaling=scaler is not None)
        if applied:
            self.optimizer.step()
            # fp16: the GradScaler skips a step whose gradients overflowed (and lowers its scale).
            applied = not getattr(self.optimizer, "step_was_skipped", False)
        elif scaler is not None:
            # clip_grad_norm_ unscaled the gradients for this step; the scaler must close it (lowering its scale when
            # they overflowed) before it unscales the next.
            scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, applied

    def clip_gradients(self, max_norm: float) -> float:
        """Clip the global gradient norm to ``max_norm``; returns the norm before clipping."""
        return float(self.accelerator.clip_grad_norm_(self.loss_module.parameters(), max_norm))

    @contextmanager
    def evaluating(self) -> Iterator[nn.Module]:
        """``loss_module`` in eval mode for forward passes without a backward; back in train mode afterwards."""
        self.loss_module.eval()
        yield self.loss_module
        self.loss_module.train()

    def optimizer_state(self) -> dict[str, Any]:
        """The full optimizer state by parameter name (``lce.train.checkpoint.full_optimizer_state``); a collective
        when sharded: every process calls it."""
        return full_optimizer_state(self.trained, self._torch_optimizer)

    def load_optimizer_state(self, path: Path) -> None:
        """Load the optimizer state of checkpoint ``path``; a collective when sharded."""
        load_optimizer_state(path, self.trained, self._torch_optimizer)

    def gather_into(self, model: nn.Module | None) -> None:
        """Copy the trained weights into the caller's ``model``; a collective when sharded, in which processes
        passing None take part without keeping anything. Here ``model`` is what trains: nothing to copy."""

    def finish(self, model: nn.Module) -> None:
        """Hand the trained weights back to the caller's ``model``, on the accelerator's device (a collective when
        sharded). Here ``model`` trained in place, where ``prepare`` put it."""

    @property
    def _torch_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer itself (inside accelerate's ``AcceleratedOptimizer`` when there is one)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)


class SingleProcess(TrainingStrategy):
    """One process: accelerate's ``prepare`` moves the loss module to the device and applies autocast; the caller's
    model trains in place."""

    name = "single_process"

    def prepare(self, model: nn.Module) -> None:
        self.loss_module, self.optimizer = self.accelerator.prepare(NextTokenLoss(model, self.cfg.loss_chunk_size),
                                                                    build_optimizer(model, self.cfg))
        self.trained = model


class DataParallel(SingleProcess):
    """Several processes with the whole model each: accelerate's ``prepare`` also wraps the loss module in DDP, which
    averages the gradients over processes in the backward of each step's last micro-batch (``accumulate``)."""

    name = "ddp"


class Fsdp2(TrainingStrategy):
    """FSDP2 (``lce.train.fsdp``): a copy of the caller's model trains sharded, each decoder layer one unit and the
    loss module the root; the caller's model waits on the CPU and receives the weights at each checkpoint and at the
    end."""

    name = "fsdp2"

    def prepare(self, model: nn.Module) -> None:
        self.trained = copy.deepcopy(model.cpu())
        self.loss_module = fsdp.shard(NextTokenLoss(self.trained, self.cfg.loss_chunk_size),
                                      adapter_for(self.trained).layers(self.trained), self.settings)
        # Built on the sharded parameters, so each process keeps AdamW state for its shards only.
        self.optimizer = build_optimizer(self.trained, self.cfg)

    def forward_backward(self, batch: Batch, last: bool) -> torch.Tensor:
        # Reduce-scatter gradients after the last micro-batch only. accelerate.accumulate does the same when its
        # distributed type is FSDP, which it never is on CPU processes (lce.train.fsdp).
        self.loss_module.set_requires_gradient_sync(last)
        return super().forward_backward(batch, last)

    def clip_gradients(self, max_norm: float) -> float:
        norm = self.accelerator.clip_grad_norm_(self.loss_module.parameters(), max_norm)
        # The norm over sharded gradients, replicated on every process.
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    @contextmanager
    def evaluating(self) -> Iterator[nn.Module]:
        with super().evaluating() as loss_module:
            yield loss_module
            # FSDP2 keeps the root unit gathered from a forward to its backward; without a backward, shard it again
            # here so that the registered parameters are the optimizer's shards when the next step or checkpoint
            # looks for them.
            for module in loss_module.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def gather_into(self, model: nn.Module | None) -> None:
        fsdp.gather_parameters(self.trained, model)

    def finish(self, model: nn.Module) -> None:
        self.gather_into(model)
        model.to(self.accelerator.device)


class Zero3(TrainingStrategy):
    """DeepSpeed ZeRO-3 (``lce.train.zero3``): a copy of the caller's model trains partitioned inside a DeepSpeed
    engine (``loss_module``), which accumulates, clips and steps itself; the caller's model waits on the CPU and
    receives the fp32 master weights at each checkpoint and at the end.

    Attributes:
        group_names: the parameter names of each AdamW group (DeepSpeed's flat partitions replace the parameters in
            the groups; checkpoints name them).
    """

    name = "zero3"

    def prepare(self, model: nn.Module) -> None:
        self.trained = copy.deepcopy(model.cpu())
        optimizer = build_optimizer(self.trained, self.cfg)
        names = {id(p): name for name, p in self.trained.named_parameters()}
        self.group_names = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        self.loss_module = zero3.initialize(NextTokenLoss(self.trained, self.cfg.loss_chunk_size), optimizer,
                                            self.cfg, self.settings, self.trained.config.hidden_size)
        zero3.set_master_weights(self.loss_module, self.trained, model)
        self.optimizer = self.loss_module.optimizer

    def forward_backward(self, batch: Batch, last: bool) -> torch.Tensor:
        nll = self.loss_module(batch.inputs, batch.targets, batch.position_ids, batch.attention_mask)
        # DeepSpeed divides by grad_accum like accelerate, and steps (clipping first) after the last micro-batch.
        self.loss_module.backward(nll.sum() / max(batch.scored, 1))
        self.loss_module.step()
        return nll

    def update(self, loss: float) -> tuple[float, bool]:
        # The engine stepped inside the last micro-batch, skipping a non-finite gradient norm itself; its norm is
        # taken before clipping, over all partitions, and is inf when it skipped the step.
        return float(self.loss_module.get_global_grad_norm()), not zero3.step_skipped(self.loss_module)

    def optimizer_state(self) -> dict[str, Any]:
        return zero3.full_optimizer_state(self.loss_module, self.trained, self.group_names)

    def load_optimizer_state(self, path: Path) -> None:
        zero3.load_optimizer_state(self.loss_module, self.trained, read_optimizer_state(path)["state"])

    def gather_into(self, model: nn.Module | None) -> None:
        zero3.gather_parameters(self.loss_module, self.trained, model)

    def finish(self, model: nn.Module) -> None:
        self.gather_into(model)
        self.loss_module.destroy()  # removes DeepSpeed's hooks from the trained copy, so that it can be freed
        model.to(self.accelerator.device)


STRATEGIES: dict[str, type[TrainingStrategy]] = {
    cls.name: cls for cls in (SingleProcess, DataParallel, Fsdp2, Zero3)
}


def launch_strategy(accelerator: Accelerator) -> tuple[str, Any]:
    """The name of the strategy this launch asks for, and its settings (None for one process and DDP).

    Raises:
        ConfigError: the launch config asks for something lce does not do under FSDP or DeepSpeed
            (``lce.train.fsdp.fsdp_settings``, ``lce.train.zero3.zero3_settings``), or for both at once.
    """
    zero3_settings = zero3.zero3_settings(accelerator.mixed_precision)
    fsdp_settings = fsdp.fsdp_settings(accelerator, accelerator.mixed_precision)
    if zero3_settings is not None and fsdp_settings is not None:
        raise ConfigError("accelerate launch config: asks for both DeepSpeed (ACCELERATE_USE_DEEPSPEED) and FSDP "
                          "(ACCELERATE_USE_FSDP); launch with one of conf/accelerate/ and unset the other variable")
    if zero3_settings is not None:
        return Zero3.name, zero3_settings
    if fsdp_settings is not None:
        return Fsdp2.name, fsdp_settings
    return (DataParallel.name if accelerator.num_processes > 1 else SingleProcess.name), None


def select_strategy(accelerator: Accelerator, cfg: TrainConfig) -> TrainingStrategy:
    """The training strategy of this launch (``launch_strategy``), not yet prepared."""
    name, settings = launch_strategy(accelerator)
    return STRATEGIES[name](accelerator, cfg, settings)
