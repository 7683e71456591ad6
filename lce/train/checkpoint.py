"""Training checkpoints in safetensors and JSON only (no pickle, so loading one never runs code).

Layout of one checkpoint, named by the global optimizer step it was taken after::

    out_dir/checkpoints/step_00000200/
        model.safetensors      model state dict (tied weights stored once, see ``safetensors.torch.save_model``)
        optimizer.safetensors  optimizer state tensors as ``state.{param_index}.{name}`` (AdamW: step, exp_avg, ...)
        rng.safetensors        ``torch`` CPU RNG state and ``cuda.{i}`` per CUDA device when present
        state.json             global_step, data_position, epoch, optimizer_param_groups, rng (numpy, python),
                               config (the TrainConfig), extra (whatever the caller passes)

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

from lce.train.config import TrainConfig

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step_(\d+)")
_TMP_PREFIX = ".tmp-"


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    """Where the checkpoint taken after global step ``step`` lives."""
    return Path(out_dir) / CHECKPOINTS / f"step_{step:08d}"


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
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
        model: the unwrapped model.
        optimizer: its optimizer; every per-parameter state value must be a tensor (true of torch's optimizers).
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
    optimizer_state = optimizer.state_dict()
    save_file(_flatten_optimizer_state(optimizer_state["state"]), str(tmp / "optimizer.safetensors"))
    save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
    state = {
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
        model: the unwrapped model, built with the same architecture; weights are copied in place.
        optimizer: optimizer over the same parameters in the same order; None leaves optimizers alone.
        restore_rng: also restore torch (CPU and CUDA), numpy and python ``random`` RNG states.

    Returns:
        The checkpoint's ``state.json`` contents.
    """
    path = Path(path)
    state = read_state(path)
    device = next(model.parameters()).device
    load_model(model, path / "model.safetensors", strict=True, device=str(device))
    if optimizer is not None:
        optimizer.load_state_dict({
            "state": _unflatten_optimizer_state(load_file(path / "optimizer.safetensors")),
            # JSON has no tuples; torch optimizers keep hyperparameters such as betas as tuples.
            "param_groups": [
                {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
                for group in state["optimizer_param_groups"]
            ],
        })
    if restore_rng:
        _restore_rng(load_file(path / "rng.safetensors"), state["rng"])
    return state


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


def _flatten_optimizer_state(state: dict[int, dict[str, Any]]) -> dict[str, torch.Tensor]:
    flat = {}
    for index, values in state.items():
        for name, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {index}.{name} is a {type(value).__name__}, not a tensor")
            flat[f"state.{index}.{name}"] = value.detach().contiguous()
    return flat


def _unflatten_optimizer_state(flat: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
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
