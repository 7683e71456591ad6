"""NTK-aware scaling (bloc97 2023; YaRN paper, Peng et al. 2023, arXiv:2309.00071, eq. 16 and App. A.1): a new base.

``b' = b * s^(d / (d - 2))`` (``lce.posenc.frequencies.ntk_base``) stretches the lowest frequency exactly like PI while
leaving the highest unchanged, spreading the interpolation over the frequencies instead of dividing them all by
``s``. transformers v5 has no static NTK type, so the method only sets ``rope_theta`` (any ``rope_type`` the model has
stays), and a saved checkpoint loads in vanilla transformers as a plain RoPE model with that base. Known property
(YaRN §3.1): the extension actually reached is shorter than ``s`` -- set ``factor`` above the target ratio, or give the
base directly (the YaRN ablation used ``rope_theta = 20000`` for 4k -> 8k).
"""

from dataclasses import dataclass

from lce.posenc.base import POSENCS, PosEnc
from lce.posenc.frequencies import check_factor, check_positive, ntk_base, rope_theta


@POSENCS.register("ntk")
@dataclass(frozen=True)
class Ntk(PosEnc):
    """Static NTK-aware base change.

    Attributes:
        factor: ``s`` in ``b' = b * s^(d / (d - 2))`` (``d`` the rotary dim, ``b`` the model's ``rope_theta``).
        rope_theta: the new base, used as given instead of the one derived from ``factor``; null derives it.
    """

    name: str = "ntk"
    factor: float = 4.0
    rope_theta: float | None = None

    def __post_init__(self):
        super().__post_init__()
        check_factor(self.factor)
        check_positive(self.rope_theta, "posenc.rope_theta")

    def apply(self, target) -> None:
        target.require_rotary(self.name)
        dim = target.adapter.rotary_dim(target.model)
        base = self.rope_theta or ntk_base(rope_theta(target, self.name), self.factor, dim)
        target.set_rope_parameters(self.name, rope_theta=float(base))
