"""Training checkpoints in safetensors and JSON only (no pickle, so loading one never runs code).

Layout of one checkpoint, named by the global optimizer step it was taken after::

    out_dir/checkpoints/step_00000200/
        model.safetensors      full model state dict (tied weights stored once, see ``safetensors.torch.save_model``)
        optimizer.safetensors  full optimizer state as ``state.{parameter name}.{name}`` (AdamW: step, exp_avg, ...)
        rng.safetensors        ``torch`` CPU RNG state and ``cuda.{i}`` per CUDA device when present
        state.json             format, global_step, data_position, epoch, optimizer_param_groups (parameters by name),
                               rng (numpy, python), config (the TrainConfig), extra (whatever the caller passes)

Everything is unsharded and keyed by parameter name, so a checkpoint written by one process, by DDP, by FSDP2
(``lce.train.fsdp``) or by DeepSpeed ZeRO-3 (``lce.train.zero3``) resumes under any of them: ``full_optimizer_state``
gathers a sharded optimizer's state through ``torch.distributed.checkpoint.state_dict`` and ``load_optimizer_state``
scatters it back (ZeRO-3 has its own gather and scatter, on the names ``read_optimizer_state`` gives).
``state.json`` records the layout's ``format`` so that a checkpoint of another layout is refused by name rather than
misread.

A checkpoint is written into a hidden temporary directory, ``state.json`` last, and then renamed into place with
``os.replace``; a process killed mid-save leaves only the temporary directory, which ``latest_checkpoint`` ignores
and the next ``prune`` removes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from lce.errors import LceError
from lce.train.config import TrainConfig

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step_(\d+)")
_TMP_PREFIX = ".tmp-"
FORMAT = 2  # the optimizer state keyed by parameter name, the only layout lce reads


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    """Where the checkpoint taken after global step ``step`` lives."""
    return Path(out_dir) / CHECKPOINTS / f"step_{step:08d}"


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full (unsharded) state of ``optimizer`` on the CPU, keyed by the names of ``model``'s parameters.

    With a model sharded by FSDP2 this is a collective: every process calls it, and the main process receives the
    state (the others an empty dict). Otherwise it is a local copy.

    Args:
        model: the module whose parameters ``optimizer`` updates (the sharded copy under FSDP2, not a DDP wrapper).
        optimizer: a torch optimizer (not accelerate's wrapper).

    Returns:
        ``{"state": {name: {key: tensor}}, "param_groups": [{..., "params": [name, ...]}]}``.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=distributed))


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer_state: dict[str, Any],
    *,
    data_position: int,
    epoch: int,
    config: TrainConfig,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint atomically and return its directory.

    Args:
        out_dir: run directory; the checkpoint goes to ``out_dir/checkpoints/step_{step:08d}``.
        step: global optimizer steps taken so far.
        model: the unwrapped, unsharded model.
        optimizer_state: from ``full_optimizer_state``; every per-parameter value must be a tensor (true of
            torch's optimizers).
        data_position: global micro-batches consumed so far (where the data order resumes).
        epoch: data epoch of the next micro-batch.
        config: the run's training config, compared on resume.
        extra: further JSON-serialisable values to keep (returned under ``"extra"`` by ``load_checkpoint``).
    """
    final = checkpoint_dir(out_dir, step)
    tmp = final.with_name(_TMP_PREFIX + final.name)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    save_model(model, str(tmp / "model.safetensors"))
    save_file(_flatten_optimizer_state(optimizer_state["state"]), str(tmp / "optimizer.safetensors"))
    save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
    state = {
        "format": FORMAT,
        "global_step": step,
        "data_position": data_position,
        "epoch": epoch,
        "optimizer_param_groups": optimizer_state["param_groups"],
        "rng": {"numpy": _numpy_rng_state(), "python": list(random.getstate())},
        "config": dataclasses.asdict(config),
        "extra": extra or {},
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1))

    if final.exists():
        # Re-saving a step replaces it; a kill between these two calls loses only this step, older ones remain.
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def read_state(path: str | Path) -> dict[str, Any]:
    """The ``state.json`` of checkpoint ``path`` without loading any tensors."""
    return json.loads((Path(path) / "state.json").read_text())


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore model weights, optimizer state and RNG states from checkpoint ``path``.

    Args:
        path: a checkpoint directory (e.g. from ``latest_checkpoint``).
        model: the unwrapped, unsharded model, built with the same architecture; weights are copied in place.
        optimizer: a torch optimizer over ``model``'s parameters; None leaves optimizers alone (under FSDP2, load
            the weights first, shard, then ``load_optimizer_state`` into the sharded model's optimizer).
        restore_rng: also restore torch (CPU and CUDA), numpy and python ``random`` RNG states.

    Returns:
        The checkpoint's ``state.json`` contents.
    """
    state = read_state(path)
    load_weights(path, model)
    if optimizer is not None:
        load_optimizer_state(path, model, optimizer)
    if restore_rng:
        restore_rng_state(path)
    return state


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Copy the weights of checkpoint ``path`` into the unsharded ``model`` (every name must match)."""
    device = next(model.parameters()).device
    load_model(model, Path(path) / "model.safetensors", strict=True, device=str(device))


def load_optimizer_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the optimizer state of checkpoint ``path`` into ``optimizer``, matched to ``model``'s parameters by name.

    With a model sharded by FSDP2 this is a collective: the main process reads the file and each process receives
    its shards (``broadcast_from_rank0``); otherwise each process reads the file.

    Args:
        path: a checkpoint directory.
        model: the module whose parameters ``optimizer`` updates (sharded or not, never a DDP wrapper).
        optimizer: a torch optimizer (not accelerate's wrapper) with the parameter groups it was saved with.
    """
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    full: dict[str, Any] = {}
    if not sharded or torch.distributed.get_rank() == 0:
        full = read_optimizer_state(path)
    set_optimizer_state_dict(model, optimizer, full,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded))
    # JSON, and torch.distributed.checkpoint's flattening of a full state, have no tuples; torch optimizers keep
    # hyperparameters such as AdamW's betas as tuples.
    for group in optimizer.param_groups:
        group.update({k: tuple(v) for k, v in group.items() if isinstance(v, list) and k != "params"})


def read_optimizer_state(path: str | Path) -> dict[str, Any]:
    """The full optimizer state of checkpoint directory ``path`` keyed by parameter name, as ``full_optimizer_state``
    returns it.

    Raises:
        LceError: the checkpoint's ``format`` is not ``FORMAT``.
    """
    state = read_state(path)
    if state.get("format") != FORMAT:
        raise LceError(f"checkpoint {path} has format {state.get('format')!r}; this lce reads format {FORMAT} "
                       "(optimizer state keyed by parameter name) only")
    return {"state": _unflatten_optimizer_state(load_file(Path(path) / "optimizer.safetensors")),
            "param_groups": state["optimizer_param_groups"]}


def restore_rng_state(path: str | Path) -> None:
    """Restore the torch (CPU and CUDA), numpy and python ``random`` RNG states saved in checkpoint ``path``."""
    _restore_rng(load_file(Path(path) / "rng.safetensors"), read_state(path)["rng"])


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``out_dir``, or None."""
    complete = _complete_checkpoints(out_dir)
    return complete[-1] if complete else None


def prune(out_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints, and temporary directories left by interrupted saves.

    Call it only from the process that writes checkpoints, after its save has returned.

    Returns:
        The deleted directories.
    """
    complete = _complete_checkpoints(out_dir)
    root = Path(out_dir) / CHECKPOINTS
    leftovers = sorted(root.glob(_TMP_PREFIX + "*")) if root.is_dir() else []
    doomed = complete[: max(0, len(complete) - keep)] + leftovers
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def _complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoint directories holding a ``state.json`` (written last), oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and (path / "state.json").is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def _flatten_optimizer_state(state: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    flat = {}
    for param_name, values in state.items():
        for name, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {param_name}.{name} is a {type(value).__name__}, not a tensor")
            if "." in name:
                raise TypeError(f"optimizer state {param_name}.{name}: a state name with a dot cannot be stored")
            flat[f"state.{param_name}.{name}"] = value.detach().contiguous()
    return flat


def _unflatten_optimizer_state(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        param_name, name = key.removeprefix("state.").rsplit(".", 1)
        state.setdefault(param_name, {})[name] = value
    return state


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors


def _numpy_rng_state() -> list[Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), pos, has_gauss, cached]


def _restore_rng(tensors: dict[str, torch.Tensor], states: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda.{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda.{i}"], i)
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
