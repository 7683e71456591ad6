"""YaRN (Peng et al. 2023, arXiv:2309.00071): NTK-by-parts frequencies (§3.2) plus an attention temperature (§3.4).

Pairs that turn more than ``beta_fast`` times over the training length ``L`` keep their frequency, pairs that turn
fewer than ``beta_slow`` times are interpolated like PI (``theta / s``), and a linear ramp over the pair index blends
the two in between (``lce.posenc.frequencies.yarn_inv_freq``). cos and sin are multiplied by ``0.1 ln s + 1``
(eq. 21-22), i.e. attention logits by its square. Matches ``LlamaYaRNScaledRotaryEmbedding`` of jquesnelle/yarn and
transformers' ``yarn`` rope type, through which it is applied (a saved checkpoint loads in vanilla transformers).

Choices made explicit as fields (transformers' names and defaults): ``truncate`` (the reference floors/ceils the ramp
bounds to whole pairs), ``attention_factor`` (*replaces* the computed temperature, as in transformers; vLLM multiplies
instead), ``mscale``/``mscale_all_dim`` (DeepSeek's ratio of two temperatures). The ramp is computed on
``original_max_position_embeddings``, never on the extended length (the transformers <= 4.4x bug).
Paper fine-tuning: s = 16, lr 2e-5, 400 steps at 64k; ``dynamic_yarn`` (``lce.posenc.dynamic``) scales with the length.
"""

from dataclasses import dataclass

from lce.config import check
from lce.posenc.base import POSENCS, PosEnc
from lce.posenc.frequencies import check_factor, check_positive, resolve_original_length


def check_yarn_fields(config) -> None:
    """The checks YaRN and dynamic YaRN share (betas, temperature, original length)."""
    check_positive(config.beta_slow, "posenc.beta_slow")
    check(config.beta_fast > config.beta_slow, "posenc.beta_fast",
          f"must be > beta_slow (rotations at which the ramp starts vs ends), got beta_fast={config.beta_fast}, "
          f"beta_slow={config.beta_slow}")
    check_positive(config.attention_factor, "posenc.attention_factor")
    check_positive(config.mscale, "posenc.mscale")
    check_positive(config.mscale_all_dim, "posenc.mscale_all_dim")
    check((config.mscale is None) == (config.mscale_all_dim is None), "posenc.mscale",
          "set both mscale and mscale_all_dim (DeepSeek's temperature ratio) or neither; "
          f"got mscale={config.mscale}, mscale_all_dim={config.mscale_all_dim}")
    check(config.original_max_position_embeddings is None or config.original_max_position_embeddings >= 1,
          "posenc.original_max_position_embeddings", f"must be >= 1, got {config.original_max_position_embeddings}")


@POSENCS.register("yarn")
@dataclass(frozen=True)
class Yarn(PosEnc):
    """NTK-by-parts interpolation with YaRN's attention temperature.

    Attributes:
        factor: ``s = L' / L``.
        original_max_position_embeddings: ``L``, the length the ramp is computed on; null = the model's training
            length (its ``original_max_position_embeddings`` if its config has one, else ``max_position_embeddings``).
        beta_fast: pairs with more rotations than this over ``L`` are kept (paper's beta = 32).
        beta_slow: pairs with fewer rotations than this are fully interpolated (paper's alpha = 1).
        attention_factor: cos/sin multiplier replacing the computed temperature (e.g. 1.0 turns it off); null
            computes ``0.1 ln s + 1``.
        mscale, mscale_all_dim: DeepSeek's temperature ``mscale(s, mscale) / mscale(s, mscale_all_dim)`` with
            ``mscale(s, m) = 0.1 m ln s + 1``; both or neither.
        truncate: floor/ceil the ramp bounds to whole pairs (the reference code); false keeps fractional bounds.
    """

    name: str = "yarn"
    factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_factor(self.factor)
        check_yarn_fields(self)

    def apply(self, target) -> None:
        target.set_rope_parameters(
            self.name,
            rope_type="yarn",
            factor=float(self.factor),
            original_max_position_embeddings=resolve_original_length(self, target),
            beta_fast=float(self.beta_fast),
            beta_slow=float(self.beta_slow),
            attention_factor=_float_or_none(self.attention_factor),
            mscale=_float_or_none(self.mscale),
            mscale_all_dim=_float_or_none(self.mscale_all_dim),
            truncate=bool(self.truncate),
        )


def _float_or_none(value):
    return None if value is None else float(value)
