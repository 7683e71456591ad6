"""The attention-variant registry and the base class of variant configs (see ``lce.posenc.base`` for the pattern).

Every variant can be applied to a subset of layers (hybrids): ``layers`` is ``all``, a list of layer indices,
``every:N`` (layers 0, N, 2N, ...) or ``all_but_first:K``; the other layers keep full attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lce.config import check
from lce.errors import ConfigError
from lce.registry import Registry

if TYPE_CHECKING:
    from lce.core.target import PatchTarget

ATTENTIONS: Registry = Registry("attention")

LAYER_FORMS = "'all', a list of layer indices, 'every:N' or 'all_but_first:K'"


def parse_layers(spec: str | list[int], where: str = "attention.layers") -> tuple[str, int | list[int] | None]:
    """The form of a layer selection: ``("all", None)``, ``("list", [...])``, ``("every", N)`` or
    ``("all_but_first", K)``; a clear error for anything else."""
    if isinstance(spec, list):
        return "list", spec
    if spec == "all":
        return "all", None
    kind, _, value = str(spec).partition(":")
    if kind in ("every", "all_but_first") and value.isdigit():
        check(kind != "every" or int(value) >= 1, where, f"every:N needs N >= 1, got {spec!r}")
        return kind, int(value)
    raise ConfigError(f"{where}: {spec!r} is not a layer selection; use {LAYER_FORMS}")


def select_layers(spec: str | list[int], num_layers: int, where: str = "attention.layers") -> list[int]:
    """The layer indices ``spec`` names in a model of ``num_layers`` layers (sorted, validated)."""
    kind, value = parse_layers(spec, where)
    if kind == "list":
        bad = [i for i in value if not isinstance(i, int) or not 0 <= i < num_layers]
        check(not bad, where, f"layer indices {bad} are out of range for a model of {num_layers} layers "
                              f"(allowed 0..{num_layers - 1})")
        check(len(set(value)) == len(value), where, f"has duplicates: {value}")
        return sorted(value)
    if kind == "all":
        return list(range(num_layers))
    if kind == "every":
        return list(range(0, num_layers, value))
    check(value < num_layers, where, f"{spec!r} leaves no layer of {num_layers}")
    return list(range(value, num_layers))


@dataclass(frozen=True)
class AttentionVariant:
    """Base of attention-variant configs. Subclasses add ``name: str = "<key>"`` and their parameters."""

    name: str
    layers: str | list[int] = "all"

    def __post_init__(self):
        parse_layers(self.layers)  # the form only; indices are checked against the model at apply time

    def apply(self, target: PatchTarget) -> None:
        raise NotImplementedError
