"""Full causal attention: the model's own attention implementation (SDPA, eager, flash...), unchanged."""

from dataclasses import dataclass

from lce.attention.base import ATTENTIONS, AttentionVariant


@ATTENTIONS.register("full")
@dataclass(frozen=True)
class Full(AttentionVariant):
    """Identity patch: every layer keeps the model's attention implementation."""

    name: str = "full"

    def apply(self, target) -> None:
        pass
