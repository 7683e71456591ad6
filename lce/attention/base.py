"""The attention-variant registry and the base class of variant configs (see ``lce.posenc.base`` for the pattern)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lce.registry import Registry

if TYPE_CHECKING:
    from lce.hf.patch import PatchTarget

ATTENTIONS: Registry = Registry("attention")


@dataclass(frozen=True)
class AttentionVariant:
    """Base of attention-variant configs. Subclasses add ``name: str = "<key>"`` and their parameters."""

    name: str

    def apply(self, target: PatchTarget) -> None:
        raise NotImplementedError
