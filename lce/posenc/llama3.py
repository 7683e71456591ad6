"""Llama 3.1's RoPE scaling (Meta 2024, "The Llama 3 Herd of Models", arXiv:2407.21783; transformers ``llama3``).

NTK-by-parts by wavelength with ``alpha = low_freq_factor``, ``beta = high_freq_factor`` and no temperature:
wavelengths shorter than ``L / high_freq_factor`` are kept, longer than ``L / low_freq_factor`` divided by ``s``,
smoothly blended in between (the reference ``llama3_inv_freq`` in ``tests/posenc/references.py``). Defaults are
Llama 3.1's (factor 8, low 1, high 4; ``L = 8192`` there): for ``d = 128``, ``b = 5e5`` that keeps 29 pairs, scales 29
and blends 6. Applied as transformers' ``llama3`` rope type (a saved checkpoint loads in vanilla transformers;
transformers logs a warning when ``original_max_position_embeddings`` is not below ``max_position_embeddings``,
which is harmless here).
"""

from dataclasses import dataclass

from lce.config import check
from lce.posenc.base import POSENCS, PosEnc
from lce.posenc.frequencies import check_factor, check_positive, resolve_original_length


@POSENCS.register("llama3")
@dataclass(frozen=True)
class Llama3(PosEnc):
    """Llama 3.1 wavelength-banded frequency scaling.

    Attributes:
        factor: ``s``, the division applied to the low-frequency band.
        original_max_position_embeddings: ``L``; null = the model's training length.
        low_freq_factor: wavelengths above ``L / low_freq_factor`` are fully scaled.
        high_freq_factor: wavelengths below ``L / high_freq_factor`` are kept; must exceed ``low_freq_factor``.
    """

    name: str = "llama3"
    factor: float = 8.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self):
        super().__post_init__()
        check_factor(self.factor)
        check_positive(self.low_freq_factor, "posenc.low_freq_factor")
        check(self.low_freq_factor < self.high_freq_factor, "posenc.low_freq_factor",
              f"must be < high_freq_factor, got low_freq_factor={self.low_freq_factor}, "
              f"high_freq_factor={self.high_freq_factor}")
        check(self.original_max_position_embeddings is None or self.original_max_position_embeddings >= 1,
              "posenc.original_max_position_embeddings", f"must be >= 1, got {self.original_max_position_embeddings}")

    def apply(self, target) -> None:
        target.set_rope_parameters(
            self.name,
            rope_type="llama3",
            factor=float(self.factor),
            original_max_position_embeddings=resolve_original_length(self, target),
            low_freq_factor=float(self.low_freq_factor),
            high_freq_factor=float(self.high_freq_factor),
        )
