"""LongRoPE (Ding et al. 2024, arXiv:2402.13753; microsoft/LongRoPE; transformers ``longrope``, Phi-3).

Every pair gets its own rescale factor, ``theta_i' = theta_i / lambda_i`` (the reference ``longrope_inv_freq`` in
``tests/posenc/references.py``), with one list for sequences up to ``L`` (``short_factor``) and one beyond
(``long_factor``); the paper finds them by evolutionary search. cos and sin are multiplied by
``sqrt(1 + ln s / ln L)`` (the "su" policy, ``longrope_mscale`` in the same test module) at every length. Applied
as transformers' ``longrope`` rope type, which picks the list from ``max(position_ids) + 1`` in every forward
(stateless), so a saved checkpoint loads in vanilla transformers.

Without searched factors: ``short_factor`` null is all ones (RoPE within ``L``), ``long_factor`` null is the search's
starting point, YaRN's ramp blended in scale space at ``factor`` with betas 32/1
(``lce.posenc.frequencies.longrope_init_factors``). KV-cache caveat: when decoding crosses ``L`` the cached keys keep
the short-factor rotation they were computed with (as in transformers and Phi-3).
"""

from dataclasses import dataclass

from lce.config import check
from lce.posenc.base import POSENCS, PosEnc
from lce.posenc.frequencies import (
    check_factor,
    check_positive,
    longrope_init_factors,
    resolve_original_length,
    rope_theta,
)


@POSENCS.register("longrope")
@dataclass(frozen=True)
class LongRope(PosEnc):
    """Per-pair searched rescale factors with LongRoPE's magnitude scaling.

    Attributes:
        factor: ``s = L' / L``; sets the default temperature and the default ``long_factor``.
        original_max_position_embeddings: ``L``, the switch point between the lists; null = the model's training
            length.
        short_factor: ``d/2`` rescale factors for sequences up to ``L``; null = all 1.
        long_factor: ``d/2`` rescale factors beyond ``L``; null = YaRN's ramp in scale space (the search's start).
        attention_factor: cos/sin multiplier replacing ``sqrt(1 + ln s / ln L)``; null computes it.
    """

    name: str = "longrope"
    factor: float = 4.0
    original_max_position_embeddings: int | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None

    def __post_init__(self):
        super().__post_init__()
        check_factor(self.factor)
        check_positive(self.attention_factor, "posenc.attention_factor")
        for field in ("short_factor", "long_factor"):
            values = getattr(self, field)
            for i, value in enumerate(values or ()):
                check_positive(value, f"posenc.{field}[{i}]")
        check(self.original_max_position_embeddings is None or self.original_max_position_embeddings >= 2,
              "posenc.original_max_position_embeddings", f"must be >= 2, got {self.original_max_position_embeddings}")

    def apply(self, target) -> None:
        target.require_rotary(self.name)
        pairs = target.adapter.rotary_dim(target.model) // 2
        length = resolve_original_length(self, target)
        base = rope_theta(target, self.name)
        short = [float(v) for v in self.short_factor] if self.short_factor is not None else [1.0] * pairs
        long = ([float(v) for v in self.long_factor] if self.long_factor is not None
                else longrope_init_factors(2 * pairs, base, self.factor, length))
        for field, values in (("short_factor", short), ("long_factor", long)):
            check(len(values) == pairs, f"posenc.{field}",
                  f"must have {pairs} values (rotary dim / 2 of this model), got {len(values)}")
        target.set_rope_parameters(
            self.name,
            rope_type="longrope",
            factor=float(self.factor),
            original_max_position_embeddings=length,
            short_factor=short,
            long_factor=long,
            attention_factor=None if self.attention_factor is None else float(self.attention_factor),
        )
