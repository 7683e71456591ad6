"""FSDP2 for the training loop: torch's ``fully_shard`` on every decoder layer, set up by an accelerate launch config.

Fully sharded data parallelism (ZeRO-3, Rajbhandari et al. 2020, arXiv:1910.02054 §5; PyTorch FSDP, Zhao et al. 2023,
arXiv:2304.11277) keeps on each process one shard of every parameter, of its gradient and of its AdamW state, and
gathers a unit's full parameters only while the unit runs. ``conf/accelerate/fsdp2.yaml`` (GPUs) and
``cpu_fsdp2.yaml`` (2 CPU processes over gloo) ask for it; ``fsdp_settings`` reads their ``fsdp_config``.

lce shards the model itself instead of through ``Accelerator.prepare``:

* The loss reads the output layer's weight directly (``lce.hf.lm.loss_head``: the fused cross-entropy never forms
  logits), outside any ``forward`` of the output layer. The root FSDP unit is therefore the loss module: embeddings,
  final norm and output layer are gathered for its whole forward; each decoder layer is a unit of its own.
* accelerate 1.15 turns only GPU-like launches into FSDP (``AcceleratorState.__init__``); CPU processes get plain
  gloo data parallelism, the FSDP settings left in the environment. Sharding here is one code path for both.
* A copy of the caller's model is sharded and trained; the caller's model stays whole (and on the CPU while
  training), receives the trained weights (``gather_parameters``) and is a plain transformers model again at the end,
  as under DDP. Each process still loads the whole model into host memory first, like DDP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from torch.distributed.tensor import DTensor

from lce.errors import ConfigError


@dataclass(frozen=True)
class FsdpSettings:
    """How ``shard`` wraps the model.

    Attributes:
        reshard_after_forward: free each decoder layer's gathered parameters after its forward (gather them again for
            the backward): less memory, one more all-gather per layer.
        offload_params: keep parameters, gradients and optimizer state on the CPU (the optimizer steps there).
        param_dtype: dtype of the gathered parameters the forward and backward compute with (``torch.bfloat16`` for
            ``mixed_precision=bf16``; None keeps the parameters' own). Gradients are reduced in float32 then.
        layer_classes: decoder layer class names the launch config names (``fsdp_transformer_layer_cls_to_wrap``);
            empty: whatever the model's adapter lists as its layers.
    """

    reshard_after_forward: bool = True
    offload_params: bool = False
    param_dtype: torch.dtype | None = None
    layer_classes: tuple[str, ...] = ()


def fsdp_settings(accelerator: Accelerator, mixed_precision: str) -> FsdpSettings | None:
    """The FSDP2 settings of this launch, or None when the launch does not ask for FSDP.

    Args:
        accelerator: this run's accelerator.
        mixed_precision: the resolved ``train.mixed_precision`` (``no``, ``bf16`` or ``fp16``).

    Raises:
        ConfigError: the launch config asks for something lce does not do under FSDP (FSDP1, another wrap policy,
            accelerate's activation checkpointing or rank-0-only loading, fp16).
    """
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
    elif (accelerator.distributed_type == DistributedType.MULTI_CPU
          and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")):
        plugin = FullyShardedDataParallelPlugin()  # reads the launch config's FSDP_* environment, as accelerate would
    else:
        return None
    problems = []
    if plugin.fsdp_version != 2:
        problems.append(f"fsdp_version is {plugin.fsdp_version}; lce shards with FSDP2 only (fsdp_version: 2)")
    if getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy) is not transformer_auto_wrap_policy:
        problems.append("fsdp_auto_wrap_policy must be TRANSFORMER_BASED_WRAP: lce shards each decoder layer")
    if plugin.activation_checkpointing:
        problems.append("fsdp_activation_checkpointing must be false; use train.gradient_checkpointing=true")
    if plugin.cpu_ram_efficient_loading:
        problems.append("fsdp_cpu_ram_efficient_loading must be false: lce loads the whole model on every process "
                        "(with it, transformers would load weights on rank 0 only)")
    if mixed_precision == "fp16":
        problems.append("train.mixed_precision=fp16 needs a sharded gradient scaler; use bf16 (or no)")
    if problems:
        raise ConfigError("accelerate FSDP launch config: " + "; ".join(problems))
    return FsdpSettings(
        reshard_after_forward=plugin.reshard_after_forward,
        offload_params=isinstance(plugin.cpu_offload, CPUOffloadPolicy),
        param_dtype=torch.bfloat16 if mixed_precision == "bf16" else None,
        layer_classes=tuple(plugin.transformer_cls_names_to_wrap or ()),
    )


def shard(root: nn.Module, layers: list[nn.Module], settings: FsdpSettings) -> nn.Module:
    """Apply ``fully_shard`` to each of ``layers`` and then to ``root`` (in place); returns ``root``.

    Args:
        root: the module whose ``forward`` computes the loss; it holds the parameters outside the layers
            (embeddings, final norm, output layer), which stay gathered for its whole forward and backward.
        layers: the decoder layers inside ``root``, one shard unit each.
        settings: from ``fsdp_settings``.

    Raises:
        ConfigError: ``settings.layer_classes`` names other classes than those of ``layers``.
    """
    actual = sorted({type(layer).__name__ for layer in layers})
    if settings.layer_classes and sorted(set(settings.layer_classes)) != actual:
        raise ConfigError(f"accelerate FSDP launch config: fsdp_transformer_layer_cls_to_wrap is "
                          f"{','.join(settings.layer_classes)}, but this model's decoder layers are "
                          f"{','.join(actual)}; "
                          "name those or leave the setting out")
    common = {
        # Reduce in float32 whatever the compute dtype: bf16 gradient sums over processes lose the small terms.
        "mp_policy": MixedPrecisionPolicy(param_dtype=settings.param_dtype,
                                          reduce_dtype=torch.float32 if settings.param_dtype else None),
        # Pinned host memory lets the copies to and from a GPU overlap with compute; without one there are none.
        "offload_policy": (CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if settings.offload_params
                           else OffloadPolicy()),
    }
    for layer in layers:
        fully_shard(layer, reshard_after_forward=settings.reshard_after_forward, **common)
    # The root keeps its parameters gathered from forward to backward (torch's default for the root unit).
    return fully_shard(root, **common)


def gather_parameters(sharded: nn.Module, into: nn.Module | None) -> None:
    """Copy the full value of every parameter of ``sharded`` into the same-named parameter of ``into``.

    A collective: every process calls it, in the same order; each parameter is gathered on its own, so at most one
    full parameter exists at a time beyond ``into``. Processes that pass ``into=None`` take part without keeping
    anything (checkpoints are written by the main process only).

    Args:
        sharded: the sharded module (DTensor parameters).
        into: an unsharded module with the same parameter names (the caller's model), or None.
    """
    targets = dict(into.named_parameters()) if into is not None else {}
    with torch.no_grad():
        for name, param in sharded.named_parameters():
            full = param.full_tensor() if isinstance(param, DTensor) else param
            if into is not None:
                targets[name].copy_(full)
