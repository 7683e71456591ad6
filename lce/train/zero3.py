"""DeepSpeed ZeRO-3 for the training loop: lce builds the engine itself, set up by an accelerate launch config.

ZeRO stage 3 (Rajbhandari et al. 2020, arXiv:1910.02054 §5) keeps on each process one partition of every parameter,
of its gradient and of its fp32 master weight and Adam moments, and gathers a module's full parameters while it runs.
``conf/accelerate/deepspeed_zero3.yaml`` (GPUs) and ``cpu_deepspeed_zero3.yaml`` (2 CPU processes over gloo) ask for
it; ``zero3_settings`` reads what ``accelerate launch`` put into the environment.

lce calls ``deepspeed.initialize`` itself instead of ``Accelerator.prepare``, as it shards FSDP2 itself
(``lce.train.fsdp``): accelerate 1.15 runs DeepSpeed on GPUs only and turns CPU processes into plain data
parallelism. The engine trains a copy of the caller's model with lce's AdamW parameter groups as its client optimizer
and lce's learning rate, set on those groups before each step; DeepSpeed divides the loss by ``train.grad_accum``,
averages gradients over processes and clips their global norm to ``train.grad_clip``, as the DDP path does.

Checkpoints are lce's own (``lce.train.checkpoint``, full tensors by parameter name): the fp32 master weights and Adam
moments are gathered with ``deepspeed.utils.safe_get_full_*`` and written back partition by partition with
``safe_set_local_*`` (DeepSpeed 0.19's ``safe_set_full_*`` cut the wrong slice out of a tensor whose size is not a
multiple of the process count). A ZeRO-3 checkpoint thus holds what every other checkpoint holds, and resumes under
ZeRO-3 or one process (tests/train/test_zero3.py) and, in the same format, DDP or FSDP2; and back.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lce.errors import ConfigError
from lce.train.config import TrainConfig

# What DeepSpeed calls it when accelerate's config leaves a value to the training script.
_UNSET = ("", "auto", "none")


@dataclass(frozen=True)
class Zero3Settings:
    """How ``initialize`` builds the engine.

    Attributes:
        bf16: compute in bfloat16 with fp32 master weights (``mixed_precision=bf16``); otherwise in float32.
    """

    bf16: bool = False


def zero3_settings(mixed_precision: str) -> Zero3Settings | None:
    """The ZeRO-3 settings of this launch, or None when ``accelerate launch`` does not ask for DeepSpeed.

    Args:
        mixed_precision: the resolved ``train.mixed_precision`` (``no``, ``bf16`` or ``fp16``).

    Raises:
        ConfigError: deepspeed is not installed, or the launch config asks for something lce does not do (another
            ZeRO stage, a DeepSpeed JSON config, offloading, ``zero3_init_flag``, DeepSpeed's own 16-bit save,
            gradient accumulation or clipping outside ``train``, fp16).
    """
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() not in ("1", "true"):
        return None
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("accelerate: the launch config asks for DeepSpeed, but the deepspeed package is not "
                          "installed (pip install 'deepspeed>=0.19.8'); or launch with conf/accelerate/fsdp2.yaml")
    problems = []
    if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3") != "3":
        problems.append(f"zero_stage is {env['ACCELERATE_DEEPSPEED_ZERO_STAGE']}; lce runs ZeRO stage 3 only "
                        "(ddp.yaml for data parallelism)")
    if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none").lower() not in _UNSET:
        problems.append("deepspeed_config_file is set; lce builds the DeepSpeed config from the train config, "
                        "set zero_stage in the accelerate config instead")
    for key, name in (("OFFLOAD_OPTIMIZER_DEVICE", "offload_optimizer_device"),
                      ("OFFLOAD_PARAM_DEVICE", "offload_param_device")):
        if env.get(f"ACCELERATE_DEEPSPEED_{key}", "none").lower() not in _UNSET:
            problems.append(f"{name} is {env[f'ACCELERATE_DEEPSPEED_{key}']}; lce does not offload under DeepSpeed "
                            "(none)")
    if env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false").lower() == "true":
        problems.append("zero3_init_flag must be false: lce loads the whole model on every process")
    if env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false").lower() == "true":
        problems.append("zero3_save_16bit_model must be false: lce writes its own full fp32 checkpoints")
    for key, name, own in (("GRADIENT_ACCUMULATION_STEPS", "gradient_accumulation_steps", "train.grad_accum"),
                           ("GRADIENT_CLIPPING", "gradient_clipping", "train.grad_clip")):
        if env.get(f"ACCELERATE_{key}", "auto").lower() not in _UNSET:
            problems.append(f"{name} is {env[f'ACCELERATE_{key}']}; leave it out and set {own}")
    if mixed_precision == "fp16":
        problems.append("train.mixed_precision=fp16 needs DeepSpeed's loss scaler in the checkpoints; use bf16 (or no)")
    if problems:
        raise ConfigError("accelerate DeepSpeed launch config: " + "; ".join(problems))
    return Zero3Settings(bf16=mixed_precision == "bf16")


def step_skipped(engine: nn.Module) -> bool:
    """Whether the last optimizer step of ``engine`` left the weights alone.

    The engine steps inside the last micro-batch's ``step()``, before lce sees the step's loss. DeepSpeed 0.19's
    ZeRO-3 skips a step whose global gradient norm is not finite (clearing the gradients, and reporting the norm as
    inf) with any precision, so lce's non-finite steps are skipped under ZeRO-3 too (``lce.train.nonfinite``).
    """
    return bool(engine.optimizer.overflow)


def quiet_cpu_detection() -> None:
    """Tell DeepSpeed it runs on the CPU on a machine without any accelerator, before anything imports it.

    accelerate imports deepspeed whenever it is installed, DeepSpeed requested or not: transformers'
    ``save_pretrained`` unwraps the model with accelerate's ``extract_model_from_parallel``, which imports
    ``DeepSpeedEngine``. On a machine without an accelerator deepspeed's import then warns "Setting accelerator to
    CPU. If you have GPU or other accelerator, we were unable to detect it." ``DS_ACCELERATOR=cpu`` states what its
    detection finds there, and it says nothing; where torch sees an accelerator nothing is set (deepspeed detects
    CUDA without a word), nor where ``DS_ACCELERATOR`` is set already.
    """
    try:
        accelerator = torch.accelerator.current_accelerator()
    except RuntimeError:  # torch 2.6 raises on a CPU-only build
        accelerator = None
    if accelerator is None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def initialize(root: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, settings: Zero3Settings,
               hidden_size: int) -> nn.Module:
    """The DeepSpeed ZeRO-3 engine around ``root`` (whose ``forward`` computes the loss) and the client ``optimizer``.

    Args:
        root: the loss module; DeepSpeed partitions its parameters in place.
        optimizer: a torch optimizer over ``root``'s parameters (lce's AdamW groups); DeepSpeed steps it on its fp32
            partitions.
        cfg: micro-batch size, gradient accumulation and clipping (``grad_clip`` 0: none) come from it.
        settings: from ``zero3_settings``.
        hidden_size: the model's hidden size: parameters smaller than ``10 * hidden_size`` (norms, biases) stay
            whole on every process, as accelerate's and transformers' ``auto`` value for DeepSpeed has it.
    """
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10 * hidden_size},
        # lce's AdamW on DeepSpeed's flat fp32 partitions; DeepSpeed tests only its own optimizers that way.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": settings.bf16},
        "steps_per_print": sys.maxsize,  # lce logs the steps itself
    }
    engine, *_ = deepspeed.initialize(model=root, optimizer=optimizer, config=config)
    return engine


def set_master_weights(engine: nn.Module, trained: nn.Module, source: nn.Module) -> None:
    """Make each fp32 master weight of ``engine`` the same-named parameter of ``source`` (whole, unsharded).

    DeepSpeed derives its masters from the module's own weights, which under bf16 are already rounded to bf16; the
    caller's fp32 weights (from the model, or loaded from a checkpoint) are the exact masters.

    Args:
        engine: from ``initialize``.
        trained: the model inside ``engine`` (partitioned parameters).
        source: an unsharded model with the same parameter names.
    """
    from deepspeed.utils import safe_set_local_fp32_param

    values = dict(source.named_parameters())
    for name, param in _trained_parameters(trained):
        safe_set_local_fp32_param(param, _local_partition(values[name].detach().float().cpu(), param))


def gather_parameters(engine: nn.Module, trained: nn.Module, into: nn.Module | None) -> None:
    """Copy the full fp32 master of every parameter of ``trained`` into the same-named parameter of ``into``.

    A collective like ``lce.train.fsdp.gather_parameters``: every process calls it; those passing ``into=None`` take
    part without keeping anything.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    targets = dict(into.named_parameters()) if into is not None else {}
    with torch.no_grad():
        for name, param in _trained_parameters(trained):
            full = safe_get_full_fp32_param(param)
            if into is not None:
                targets[name].copy_(full)


def full_optimizer_state(engine: nn.Module, trained: nn.Module, group_names: list[list[str]]) -> dict[str, Any]:
    """The full Adam state of ``engine`` on the CPU keyed by parameter name, as ``lce.train.checkpoint`` stores it.

    A collective: every process calls it and receives the whole state.

    Args:
        engine: from ``initialize``, after at least one optimizer step (before one there is no state to save).
        trained: the model inside ``engine``.
        group_names: the parameter names of each of the client optimizer's groups, in order.

    Returns:
        ``{"state": {name: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [{..., "params": [name, ...]}]}``.
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = engine.optimizer.optimizer
    state = {}
    for name, param in _trained_parameters(trained):
        flat_state = inner.state[_flat_partition(engine, param)]
        state[name] = {key: (value.detach().cpu().clone() if key == "step"
                             else safe_get_full_optimizer_state(param, key).detach().cpu().clone())
                       for key, value in flat_state.items()}
    groups = [{**{key: value for key, value in group.items() if key != "params"}, "params": names}
              for group, names in zip(inner.param_groups, group_names, strict=True)]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(engine: nn.Module, trained: nn.Module, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put a full Adam state keyed by parameter name (``full_optimizer_state``'s ``state``) into ``engine``.

    Torch's AdamW keeps one state per DeepSpeed flat partition, created at the first step; it is created here with
    the saved step counter (the same for every parameter of a group) and each parameter's moments written into its
    slice of the partition.
    """
    from deepspeed.utils import safe_set_local_optimizer_state

    inner = engine.optimizer.optimizer
    for name, param in _trained_parameters(trained):
        saved = state[name]
        flat = _flat_partition(engine, param)
        if flat not in inner.state:
            inner.state[flat] = {key: (value.clone() if key == "step" else torch.zeros_like(flat))
                                 for key, value in saved.items()}
        for key, value in saved.items():
            if key != "step":
                safe_set_local_optimizer_state(param, _local_partition(value.float(), param).to(flat.device), key)


def _trained_parameters(trained: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, param) for name, param in trained.named_parameters() if param.requires_grad]


def _flat_partition(engine: nn.Module, param: nn.Parameter) -> torch.Tensor:
    """The flat fp32 partition (one per optimizer sub-group) that holds this process's slice of ``param``."""
    zero = engine.optimizer
    group_index = zero.grad_position[zero.get_param_id(param)][0]
    return zero.fp32_partitioned_groups_flat[group_index]


def _local_partition(full: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """This process's slice of ``full`` as ZeRO-3 partitions ``param``: the flattened tensor, zero-padded to a
    multiple of the process count, in equal contiguous parts by rank."""
    size = param.ds_tensor.numel()
    flat = full.flatten()
    padded = torch.cat([flat, flat.new_zeros(size * torch.distributed.get_world_size() - flat.numel())])
    return padded.narrow(0, size * torch.distributed.get_rank(), size)
