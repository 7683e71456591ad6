"""Names kept for callers of lce 0.1.0 after a rename or a move: each use warns once per call site and returns the
new object, so old code keeps working while it is updated."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def renamed(module: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``module`` resolving each old name in ``names`` to its new place,
    ``"package.module.NewName"``, with a ``DeprecationWarning`` naming it."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        where, _, new = names[name].rpartition(".")
        warnings.warn(f"{module}.{name} is deprecated; use {where}.{new}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(where), new)

    return __getattr__
