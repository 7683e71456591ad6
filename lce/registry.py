"""Name -> config class registries. The key is the name of the option file in ``conf/<group>/`` and the
``name`` written into configs and results; a test keeps the three equal."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from lce.config import from_mapping, to_plain
from lce.errors import ConfigError, did_you_mean

C = TypeVar("C")


class Registry(Generic[C]):
    """Config classes of one config group, keyed by name.

    Each registered class is a dataclass with a ``name`` field whose default is its key.
    """

    def __init__(self, group: str):
        self.group = group
        self._classes: dict[str, type[C]] = {}

    def register(self, name: str) -> Callable[[type[C]], type[C]]:
        def decorate(cls: type[C]) -> type[C]:
            if name in self._classes:
                raise ValueError(f"{self.group} '{name}' is registered twice")
            field = {f.name: f for f in dataclasses.fields(cls)}.get("name")
            if field is None or field.default != name:
                raise ValueError(f"{cls.__name__} needs a field `name: str = {name!r}`")
            self._classes[name] = cls
            return cls

        return decorate

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str, where: str | None = None) -> type[C]:
        if name not in self._classes:
            raise ConfigError(
                f"{where or self.group}: unknown {self.group} '{name}'{did_you_mean(name, self._classes)}; "
                f"available: {', '.join(self.names())}"
            )
        return self._classes[name]

    def build(self, spec: Any, where: str | None = None, **params: Any) -> C:
        """A config instance from a name, a mapping with ``name``, a config node, or an instance (+ overrides)."""
        where = where or self.group
        if isinstance(spec, tuple(self._classes.values())):
            return dataclasses.replace(spec, **params) if params else spec
        spec = to_plain(spec)
        if isinstance(spec, str):
            data: dict[str, Any] = {"name": spec}
        elif isinstance(spec, Mapping):
            data = dict(spec)
            if "name" not in data:
                raise ConfigError(f"{where}: a 'name' is required; available: {', '.join(self.names())}")
        else:
            raise ConfigError(f"{where}: expected a name or a mapping with 'name', got {spec!r}")
        data.update(params)
        cls = self.get(data["name"], where)
        try:
            return from_mapping(cls, data, where)
        except ConfigError as e:
            raise self._located(e, where) from None

    def _located(self, error: ConfigError, where: str) -> ConfigError:
        """``error`` with the group prefix that config classes write (``posenc.factor: ...``) replaced by ``where``,
        the place the config came from (``eval.posencs[0].factor: ...``)."""
        message = str(error)
        if where != self.group and message.startswith((f"{self.group}.", f"{self.group}:")):
            return ConfigError(where + message[len(self.group):])
        return error
