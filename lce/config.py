"""Typed configs from plain mappings: unknown keys, wrong types and missing values are clear errors.

Every config group (model, posenc, attention, data, train, eval, logger) is a dataclass. ``from_mapping`` builds one
from a dict or an OmegaConf node, naming the offending key (``posenc.facter``) and listing the allowed ones, because
Hydra itself accepts ``+posenc.facter=2`` silently. Dataclass defaults are the single source of truth for defaults;
the YAML files under ``conf/`` repeat them with comments and a test keeps the two equal.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from lce.errors import ConfigError, did_you_mean

T = TypeVar("T")


def to_plain(node: Any) -> Any:
    """An OmegaConf node (or anything else) as plain Python containers, interpolations resolved."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return node
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from ``data``; ``where`` is the dotted config path used in error messages."""
    data = to_plain(data) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise unknown_key(f"{where}.{key}", fields)
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = coerce(data[name], hints[name], f"{where}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name}: required but not set")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def unknown_key(where: str, allowed: Iterable[str]) -> ConfigError:
    """The error for the unknown key at dotted path ``where`` (its last part is the key), listing the allowed ones."""
    key, allowed = where.rsplit(".", 1)[-1], sorted(allowed)
    return ConfigError(f"{where}: unknown key{did_you_mean(key, allowed)}; allowed keys: {', '.join(allowed)}")


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against type ``hint`` (int, float, bool, str, Literal, Optional, list, dict, dataclass)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {hint}")
    if origin is typing.Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: {value!r} is not allowed{did_you_mean(value, map(str, args))}; "
                              f"choose one of {allowed}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return type(value)(coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)) if origin is list else tuple(
            coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)
        )
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_mapping(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def check(condition: bool, where: str, message: str) -> None:
    """Raise ``ConfigError("where: message")`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{where}: {message}")


def check_at_least(config: Any, where: str, minimum: float, *names: str) -> None:
    """Raise ``ConfigError("where.name: must be >= minimum, got value")`` for the first field below ``minimum``."""
    for name in names:
        value = getattr(config, name)
        check(value >= minimum, f"{where}.{name}", f"must be >= {minimum}, got {value}")


def non_default_fields(config: Any) -> dict[str, Any]:
    """The fields of a dataclass instance whose values differ from their defaults (for labels)."""
    out = {}
    for f in dataclasses.fields(config):
        if not f.init or f.name == "name":
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING
        )
        value = getattr(config, f.name)
        if value != default:
            out[f.name] = value
    return out
