"""The score of one evaluation length: the one result type of every perplexity protocol, ``score_documents`` and the
sweep, which writes it into a row (``ProtocolScore.row_fields``; schema in ``lce.eval.sweep``).

Published protocols average differently (``lce.eval.protocols``), so a score says how its ``nll`` was formed
(``aggregation``) and keeps the token-weighted sum beside it (``nll_sum``, ``token_nll``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TOKEN_MEAN = "token_mean"
MEAN_OF_WINDOW_MEANS = "mean_of_window_means"
MEAN_OF_BATCH_MEANS = "mean_of_batch_means"


@dataclass
class ProtocolScore:
    """The result of one protocol at one evaluation length.

    Attributes:
        nll_sum: total NLL over all scored predictions (float64 accumulation).
        tokens: number of scored predictions.
        bucket_size, bucket_nll, bucket_tokens: per-position buckets (summed nats), ``canonical`` and ``streaming``
            only.
        protocol: the protocol's name.
        aggregation: how ``nll`` was formed: ``token_mean`` (summed over scored predictions, divided once),
            ``mean_of_window_means`` or ``mean_of_batch_means``.
        nll: the mean NLL (nats) the protocol reports; ``ppl = base ** nll``. None: the token mean
            ``nll_sum / tokens``.
        windows: number of forward windows that scored at least one prediction (None: not counted).
        base: the base ``nll`` is raised to (``e``; LongLoRA's scripts use the literal ``2.71828``).
        ppl_low, ppl_high, confidence: bootstrap confidence interval over documents, ``canonical`` only.
    """

    # The fields of the former ``PointScore`` come first, so that its positional construction still works.
    nll_sum: float
    tokens: int
    bucket_size: int | None = None
    bucket_nll: list[float] | None = None
    bucket_tokens: list[int] | None = None
    protocol: str = "canonical"
    aggregation: str = TOKEN_MEAN
    nll: float | None = None
    windows: int | None = None
    base: float = math.e
    ppl_low: float | None = None
    ppl_high: float | None = None
    confidence: float | None = None

    def __post_init__(self):
        if self.nll is None:
            self.nll = self.nll_sum / self.tokens

    @property
    def ppl(self) -> float:
        """``base ** nll``; ``inf`` when it overflows a float."""
        return power(self.base, self.nll)

    @property
    def token_nll(self) -> float:
        """Token-weighted mean NLL ``nll_sum / tokens``, whatever the protocol's own aggregation."""
        return self.nll_sum / self.tokens

    @property
    def bucket_mean_nll(self) -> list[float] | None:
        """Mean NLL per bucket (nats), or None without buckets."""
        if self.bucket_nll is None:
            return None
        return [s / n for s, n in zip(self.bucket_nll, self.bucket_tokens)]

    def row_fields(self) -> dict:
        """The measured fields of a result row (``lce.eval.sweep`` schema: ppl, nll, tokens, buckets as means), plus
        ``aggregation``, ``windows``, ``token_nll`` and the confidence interval."""
        return {
            "ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "aggregation": self.aggregation,
            "windows": self.windows, "token_nll": self.token_nll, "bucket_size": self.bucket_size,
            "bucket_nll": self.bucket_mean_nll, "bucket_tokens": self.bucket_tokens, "ppl_low": self.ppl_low,
            "ppl_high": self.ppl_high, "confidence": self.confidence,
        }


def power(base: float, x: float) -> float:
    """``base ** x``, or ``inf`` where it would overflow a float."""
    return math.inf if x * math.log(base) >= 709.0 else base**x
