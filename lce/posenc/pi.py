"""Position Interpolation (Chen et al. 2023, arXiv:2306.15595, §2.3; kaiokendev's SuperHOT): positions ``m -> m / s``.

RoPE angles are ``m * theta_i``, so dividing positions by ``s`` is dividing every frequency by ``s`` (the reference
``pi_inv_freq`` in ``tests/posenc/references.py``). Applied as transformers' own ``linear`` rope type, so a checkpoint
saved with it loads in vanilla transformers. The paper fine-tunes about 1000 steps (200 already reach the full passkey
range); LongLoRA sets ``factor = ceil(L' / L)``.
"""

from dataclasses import dataclass

from lce.posenc.base import POSENCS, PosEnc
from lce.posenc.frequencies import check_factor


@POSENCS.register("pi")
@dataclass(frozen=True)
class Pi(PosEnc):
    """Linear position interpolation.

    Attributes:
        factor: ``s = L' / L``, the extension ratio; ``1`` is plain RoPE.
    """

    name: str = "pi"
    factor: float = 4.0

    def __post_init__(self):
        super().__post_init__()
        check_factor(self.factor)

    def apply(self, target) -> None:
        target.set_rope_parameters(self.name, rope_type="linear", factor=float(self.factor))
