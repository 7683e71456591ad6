"""Checks of a composed ``lce`` configuration that need neither torch nor transformers.

The ``lce`` command runs them before Hydra creates the run directory and before the heavy imports (3-5 s of CPU), so a
typo in a key, a ``run_name`` that would move the results elsewhere or an ``out_root`` that cannot be written is a
one-line error at once. The option files of ``conf/`` hold every field of their config class (a test keeps them
equal), so they are the list of allowed keys; ``lce.experiment.parse_run_config`` checks everything (types, values)
again afterwards with the same messages.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lce.conf
from lce.config import check, to_plain, unknown_key
from lce.errors import ConfigError, did_you_mean
from lce.paths import unwritable_reason

CONF = Path(lce.conf.__file__).parent
#: Config groups whose node is built from the option file named by its ``name`` (``conf/<group>/<name>.yaml``).
GROUPS = ("model", "posenc", "attention", "data", "train", "eval", "logger")
#: Top-level keys that name a directory under ``out_root``.
DIRECTORY_KEYS = ("experiment_name", "run_name")


def _load_yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))


def option_keys(group: str, name: str) -> set[str]:
    """The fields of option ``name`` of ``group`` (the keys of ``conf/<group>/<name>.yaml``)."""
    path = CONF / group / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        raise ConfigError(f"{group}: unknown {group} '{name}'{did_you_mean(name, available)}; "
                          f"available: {', '.join(available)}")
    return set(_load_yaml(path))


def top_level_keys() -> set[str]:
    """The keys of a composed configuration: the scalars of ``conf/config.yaml`` and the config groups."""
    return {key for key in _load_yaml(CONF / "config.yaml") if key not in ("defaults", "hydra")} | set(GROUPS)


def check_directory_name(key: str, value: Any) -> None:
    """``experiment_name`` and ``run_name`` are one directory each: not empty, no path separator, not ``.``/``..``."""
    separators = {"/", os.sep, os.altsep} - {None}
    check(isinstance(value, str) and value not in ("", ".", "..") and not any(s in value for s in separators), key,
          f"{value!r} must be a single directory name (no {' or '.join(sorted(separators))}, not empty, '.' or '..'), "
          "since it names the directory the results go to")


def check_writable_root(out_root: str, *names: str) -> None:
    """The directory ``out_root/names...`` exists or can be created and written into."""
    reason = unwritable_reason(Path(out_root).joinpath(*names))
    if reason is not None:
        raise ConfigError(f"out_root: {reason}; choose another out_root")


def check_config(cfg: Any) -> None:
    """Unknown keys at the top level and in every group, directory names and the output location.

    Raises:
        ConfigError: naming the first problem.
    """
    data = to_plain(cfg)
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a mapping, got {data!r}")
    allowed = top_level_keys()
    for key in data:
        if key not in allowed and key != "hydra":
            raise unknown_key(key, allowed)
    for group in GROUPS:
        node = data.get(group)
        if not isinstance(node, Mapping):
            continue  # lce.experiment says what is missing or malformed
        name = node.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"{group}: a 'name' is required")
        fields = option_keys(group, name)
        for key in node:
            if key not in fields:
                raise unknown_key(f"{group}.{key}", fields)
    for key in DIRECTORY_KEYS:
        if key in data:
            check_directory_name(key, data[key])
    if isinstance(data.get("out_root"), str):
        check_writable_root(data["out_root"], *(str(data.get(k, "")) for k in DIRECTORY_KEYS))
