"""Whether a directory lce is about to write into can be made: checked before the work, not after it."""

from __future__ import annotations

import os
from pathlib import Path


def unwritable_reason(directory: str | Path) -> str | None:
    """Why ``directory`` cannot be created or written into, or None when it can: its nearest existing ancestor (itself
    when it exists) must be a directory this process may write into."""
    target = Path(directory).expanduser().absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    inside = "" if existing == target else f", so {target} cannot be created in it"
    if not existing.is_dir():
        return f"{existing} is a file, not a directory{inside}"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable{inside}"
    return None
