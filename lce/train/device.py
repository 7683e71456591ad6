"""The device a training process runs on: checked before anything runs, then honoured by accelerate.

accelerate picks its device itself (``Accelerator(cpu=...)``; the GPU of ``LOCAL_RANK`` under a launch, else the
current CUDA device) and falls back to the CPU without a word when CUDA is missing. ``check_device`` turns a
requested device into one that exists on this machine, or a one-line ConfigError naming ``device``;
``accelerator_cpu`` sets up this process so that the next ``Accelerator`` uses it; ``claimed_device`` checks that it
did.
"""

from __future__ import annotations

import os

import torch

from lce.errors import ConfigError

AUTO = "auto"  # accelerate's choice, as None


def check_device(device: torch.device | str | None) -> torch.device | None:
    """The device ``device`` names, checked to exist on this machine and to suit this process.

    Args:
        device: None or ``auto`` (accelerate's choice: this process's ``LOCAL_RANK`` GPU under a launch, else the
            current CUDA device, else the CPU), ``cpu``, ``cuda`` (the GPU accelerate would choose) or ``cuda:N``.

    Returns:
        The torch device (``cuda`` without an index stays without one), or None for accelerate's choice.

    Raises:
        ConfigError: naming ``device`` and what this machine has: not a torch device, a type other than cpu and
            cuda, CUDA where there is none, an index beyond the GPUs, or, in a process of a multi-process launch, a
            GPU other than its ``LOCAL_RANK`` one (each process trains on its own).
    """
    if device is None or device == AUTO:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device: {device!r} is not a torch device ({e}); {_available()}") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise ConfigError(f"device: {str(resolved)!r}: lce trains on cpu or cuda only; {_available()}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device: {str(resolved)!r} but CUDA is not available (torch {torch.__version__}); "
                          f"{_available()}")
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ConfigError(f"device: {str(resolved)!r} does not exist; {_available()}")
    local_rank = _local_rank()
    if local_rank is not None and resolved.index is not None and resolved.index != local_rank:
        raise ConfigError(f"device: {str(resolved)!r} in the process of LOCAL_RANK {local_rank} of a launch: each "
                          f"process trains on the GPU of its local rank (cuda:{local_rank} here); use device=auto")
    return resolved


def accelerator_cpu(device: torch.device | None) -> bool:
    """Set up this process so that the next ``Accelerator`` trains on ``device`` (from ``check_device``); returns the
    ``cpu`` argument for it.

    One process on ``cuda:N`` makes that GPU the current CUDA device, where accelerate places a single process; under a
    launch accelerate takes the ``LOCAL_RANK`` GPU, which ``check_device`` has required.
    """
    if device is None:
        return not torch.cuda.is_available()
    if device.type == "cuda" and device.index is not None and _local_rank() is None:
        torch.cuda.set_device(device)
    return device.type == "cpu"


def claimed_device(device: torch.device | None, chosen: torch.device) -> torch.device:
    """The device accelerate ``chose`` (with its CUDA index), checked to be the requested ``device``.

    Raises:
        ConfigError: accelerate chose another device (an ``ACCELERATE_TORCH_DEVICE`` in the environment overrides
            lce's choice, for one).
    """
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", torch.cuda.current_device())
    if device is not None and (device.type != chosen.type or device.index not in (None, chosen.index)):
        override = os.environ.get("ACCELERATE_TORCH_DEVICE")
        raise ConfigError(f"device: {str(device)!r} was requested but accelerate set up {str(chosen)!r}"
                          + (f" (ACCELERATE_TORCH_DEVICE={override} overrides it)" if override else ""))
    return chosen


def _local_rank() -> int | None:
    """This process's ``LOCAL_RANK`` under ``accelerate launch``/``torchrun``, else None."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value not in (None, "", "-1") else None


def _available() -> str:
    if not torch.cuda.is_available():
        return "available: cpu"
    count = torch.cuda.device_count()
    return f"available: cpu, cuda, {', '.join(f'cuda:{i}' for i in range(count))}"
