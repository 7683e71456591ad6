"""Which implementation an ``lce.kernels`` op runs: the plain-PyTorch reference or the Triton kernel.

Every op's public function takes ``backend="auto" | "ref" | "triton"`` and resolves it here:

- an explicit ``ref`` or ``triton`` argument wins;
- otherwise (``auto`` or None) the innermost ``use_backend(...)`` block that is not ``auto`` (the run config's
  ``backend`` field: ``lce.experiment.run`` wraps the run in one), then the ``LCE_BACKEND`` environment variable;
- otherwise ``auto``: Triton when every tensor is on a CUDA device and Triton imports, the reference elsewhere.

Run the backward pass inside the same ``use_backend`` block as the forward: activation checkpointing recomputes
forward ops during the backward, and a recomputation on another backend is an error (``lce.experiment.run`` wraps the
whole run, training included).

Triton kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter: slow, for tests on tiny
shapes); asking for ``triton`` on CPU without it is an error that says so, never a crash inside Triton.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

import torch

from lce.errors import ConfigError, LceError, did_you_mean

BACKENDS = ("auto", "ref", "triton")

# A context variable, not a module global: threads and asyncio tasks each see their own choice, and leaving the block
# restores the previous one.
_configured: contextvars.ContextVar[str] = contextvars.ContextVar("lce_backend", default="auto")


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works (it is a Linux-only dependency)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(name: str, where: str = "backend") -> str:
    """``name`` if it is one of ``BACKENDS``, else a ``ConfigError`` naming the allowed values."""
    if name not in BACKENDS:
        raise ConfigError(f"{where}={name!r} is not a backend; choose one of {', '.join(BACKENDS)}"
                          f"{did_you_mean(name, BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run the ops inside the block on ``backend`` unless a call names its own (``auto`` defers to ``LCE_BACKEND``)."""
    token = _configured.set(check_backend(backend))
    try:
        yield
    finally:
        _configured.reset(token)


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: ``backend`` unless it is None/auto, then ``use_backend``, then ``LCE_BACKEND``, then
    ``auto``."""
    if backend not in (None, "auto"):
        return check_backend(backend)
    if _configured.get() != "auto":
        return _configured.get()
    return check_backend(os.environ.get("LCE_BACKEND", "auto") or "auto", "LCE_BACKEND")


#: The largest second and third launch-grid dimensions CUDA allows (the first goes to 2^31 - 1); launchers that put
#: ``B * H`` or a chunk count there check against it (the interpreter has no such limit, so tests cannot hit it).
MAX_GRID_YZ = 65535


def on_device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context to launch Triton kernels on ``tensor`` in: Triton launches on the *current* CUDA device, not on
    its arguments' device, so with a model split over GPUs (``device_map="auto"``) a kernel for a layer on ``cuda:1``
    would run on ``cuda:0`` against memory it cannot address. CPU tensors (the interpreter) need no guard."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def device_capability(tensor: torch.Tensor) -> tuple[int, int] | None:
    """The CUDA compute capability of ``tensor``'s device (``(9, 0)`` on an H100/H200), or None off CUDA (the
    interpreter): launch configurations are chosen per target, as ``lce.kernels.inspect`` checks them."""
    return tuple(torch.cuda.get_device_capability(tensor.device)) if tensor.is_cuda else None


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """``ref`` or ``triton`` for an op on ``tensors``.

    Raises:
        LceError: ``triton`` was asked for but Triton is missing, or the tensors are not on CUDA and
            ``TRITON_INTERPRET=1`` is not set.
    """
    choice = requested_backend(backend)
    on_cuda = all(t.is_cuda for t in tensors)
    if choice == "auto":
        return "triton" if on_cuda and triton_available() else "ref"
    if choice == "triton":
        if not triton_available():
            raise LceError("backend 'triton' needs the triton package (pip install triton; Linux only); "
                           "use backend 'ref' or 'auto'")
        if not on_cuda and not interpreting():
            devices = sorted({str(t.device) for t in tensors})
            raise LceError(f"backend 'triton' runs on CUDA tensors, got tensors on {', '.join(devices)}; set "
                           "TRITON_INTERPRET=1 to run Triton's (slow) CPU interpreter, or use backend 'ref' or 'auto'")
    return choice
