"""The common base of the attention variants that restrict which keys each query sees (``lce.core.blockwise``
computes them when the position encoding leaves attention to the model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lce.attention.base import AttentionVariant, select_layers
from lce.config import check

if TYPE_CHECKING:
    from lce.core.plan import Restriction
    from lce.core.target import PatchTarget


@dataclass(frozen=True)
class SparseVariant(AttentionVariant):
    """Base of the attention variants that restrict which keys each query sees (subclasses build the pattern).

    Attributes:
        layers: the layers to restrict (``lce.attention.base.select_layers``); the others keep their attention.
        query_block: query rows lce's block-wise attention scores at once (with a position encoding that computes
            attention itself, such as ALiBi or DCA, its own block size applies).
    """

    query_block: int = 128

    def __post_init__(self):
        super().__post_init__()
        check(self.layers != [], "attention.layers",
              "selects no layer; list at least one index (or use attention=full to keep every layer's attention)")
        check(self.query_block >= 1, "attention.query_block", f"must be >= 1, got {self.query_block}")

    def pattern(self, target: PatchTarget) -> Restriction:
        """The restriction of every selected layer of ``target.model`` (checked against the model)."""
        raise NotImplementedError

    def apply(self, target: PatchTarget) -> None:
        selected = set(select_layers(self.layers, target.config.num_hidden_layers))
        pattern = self.pattern(target)
        target.restrict(self.name, lambda index, module: pattern if index in selected else None)

