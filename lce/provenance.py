"""Where a result came from: the git revision of the code and the versions of the libraries that produced it."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

GIT_TIMEOUT_S = 2.0


def _git(args: list[str], cwd: Path) -> str | None:
    """stdout of ``git <args>`` run in ``cwd``, or None when git fails, is missing or hangs."""
    # GIT_OPTIONAL_LOCKS=0 stops `git status` from taking the index lock, which could collide with a user's git.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_revision(path: str | Path | None = None) -> str | None:
    """Short commit sha of the checkout containing ``path``, with ``-dirty`` if tracked files have changes.

    Args:
        path: a directory inside the checkout; ``None`` tries the directory of the lce package, then the cwd.

    Returns:
        e.g. ``"1a2b3c4"`` or ``"1a2b3c4-dirty"``; None outside a git checkout, before the first commit, or when
        git is unavailable. Never raises.
    """
    candidates = [Path(path)] if path is not None else [Path(__file__).resolve().parent, Path.cwd()]
    for where in candidates:
        if not where.is_dir():
            continue
        sha = _git(["rev-parse", "--short", "HEAD"], where)
        if sha is None:
            continue
        status = _git(["status", "--porcelain", "--untracked-files=no"], where)
        # Unknown status (git failed) is reported as dirty: claiming a clean tree would be the worse mistake.
        return f"{sha}-dirty" if status != "" else sha
    return None


#: The packages whose versions decide what lce computes, recorded in every result row and printed by ``lce --version``.
TRACKED_PACKAGES = ("lce", "torch", "transformers", "accelerate", "triton", "peft", "deepspeed")


def versions() -> dict[str, str | None]:
    """Versions of python and ``TRACKED_PACKAGES`` (None for a package that is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
