"""RoPE (Su et al. 2021, arXiv:2104.09864, eq. 14-16): the model's own rotary position embedding, unchanged.

Registered so that "rope" is an explicit, recorded choice (the baseline every other method is compared with).
"""

from dataclasses import dataclass

from lce.posenc.base import POSENCS, PosEnc


@POSENCS.register("rope")
@dataclass(frozen=True)
class Rope(PosEnc):
    """Identity patch: queries and keys keep the model's rotary embedding."""

    name: str = "rope"

    def apply(self, target) -> None:
        target.require_rotary("rope")
