"""NoPE (Kazemnejad et al. 2023, arXiv:2305.19466): no explicit position information.

The causal mask alone lets a decoder infer positions. Implemented by replacing the model's rotary module with one
that returns ``cos = 1, sin = 0``, so ``q * cos + rotate_half(q) * sin == q`` exactly (no rounding: the products are
by 1 and 0), for queries and keys alike, in every layer and in the KV cache.
"""

from dataclasses import dataclass

from lce.posenc.base import POSENCS, PosEnc


@POSENCS.register("nope")
@dataclass(frozen=True)
class Nope(PosEnc):
    """Removes rotary position embedding from every layer."""

    signal = "none"
    name: str = "nope"

    def apply(self, target) -> None:
        target.neutralize_rotary()
