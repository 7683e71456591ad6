"""LoRA and LongLoRA's LoRA+ through peft: low-rank adapters for training, merged into plain weights afterwards.

LoRA (Hu et al. 2021, arXiv:2106.09685, eq. 3) trains ``W = W0 + (alpha / r) * B @ A`` with ``W0`` frozen,
``A [r, in]`` random and ``B [out, r]`` zero at the start, so the adapted model begins exactly where ``W0`` is.
LongLoRA (Chen et al. 2024, arXiv:2309.12307, §3.3, Table 2) found LoRA alone cannot adapt to a longer context
and calls "LoRA+" LoRA with the embedding and normalisation layers also trained in full (its ``fine-tune.py``:
``trainable_params="embed,norm"``; every parameter whose name contains one of them gets ``requires_grad``). Those
parameters are trained in place, not copied as peft's ``modules_to_save`` would, so merging keeps them.

``merge_lora`` folds the adapters into the base weights and removes every peft module: the result is the same
transformers model class, its patch (``config.lce``, rope parameters, attention implementation) untouched, so
``lce.save_model`` writes a plain Hugging Face checkpoint.
"""

from __future__ import annotations

from torch import nn

from lce.errors import ConfigError
from lce.train.config import TrainConfig


def apply_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Freeze ``model``, add LoRA adapters to ``cfg.lora_targets`` and unfreeze ``cfg.trainable``; returns the
    peft wrapper (``model`` itself is changed in place and still runs its own forward).

    Raises:
        ConfigError: a target module or a ``trainable`` pattern matches nothing in the model.
    """
    from peft import LoraConfig, get_peft_model

    names = [name for name, _ in model.named_modules()]
    for target in cfg.lora_targets:
        if not any(name.split(".")[-1] == target for name in names):
            raise ConfigError(f"train.lora_targets: no module of {type(model).__name__} is called {target!r}; "
                              f"linear layers here: {', '.join(sorted(linear_layer_names(model)))}")
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(cfg.lora_targets), bias="none")
    wrapped = get_peft_model(model, config)
    for pattern in cfg.trainable:
        matched = [p for name, p in model.named_parameters() if pattern in name and "lora_" not in name]
        if not matched:
            raise ConfigError(f"train.trainable: no parameter name of {type(model).__name__} contains {pattern!r}")
        for param in matched:
            param.requires_grad_(True)
    return wrapped


def merge_lora(wrapped: nn.Module) -> nn.Module:
    """Fold the adapters of ``apply_lora``'s wrapper into the base weights; returns the plain base model."""
    return wrapped.merge_and_unload()


def linear_layer_names(model: nn.Module) -> set[str]:
    """Distinct short names of the ``nn.Linear`` modules of ``model`` (what ``lora_targets`` may name)."""
    return {name.split(".")[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, each shared tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total
