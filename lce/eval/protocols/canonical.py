"""``canonical``: every document truncated to L tokens, NLL summed and divided once, with position buckets and a
bootstrap confidence interval over documents (nanoGPT's ``evaluate_bpb`` rule)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lce.config import check
from lce.eval.perplexity import NllFn, document_nll, point_score
from lce.eval.protocols.registry import PROTOCOLS, Protocol
from lce.eval.protocols.windows import as_documents, check_length
from lce.eval.score import ProtocolScore, power


@PROTOCOLS.register("canonical")
@dataclass(frozen=True)
class CanonicalProtocol(Protocol):
    """Every document truncated to its first L tokens, one window each; NLL summed over all predictions, divided once.

    This is ``lce.eval.perplexity.score_documents`` (same numbers; nanoGPT's ``evaluate_bpb`` rule) plus
    per-position buckets (as FLA ``evals/ppl.py --bucket_size`` reports them) and a percentile bootstrap confidence
    interval over documents: documents are resampled with replacement ``n_bootstrap`` times (numpy
    ``default_rng(seed)``), each resample's token-weighted NLL computed, and the ``(1 -/+ confidence) / 2``
    quantiles reported as ``ppl_low`` / ``ppl_high``. Documents, not tokens, are the independent units: tokens of
    one document are correlated, so a per-token interval would be far too narrow. ``bos_id`` is ignored: documents
    are scored as given.

    Attributes:
        bucket_size: predicting positions per bucket; None: one bucket for the window.
        n_bootstrap: bootstrap resamples; 0 disables the interval.
        confidence: coverage of the interval.
        seed: seed of the resampling.
    """

    name: str = "canonical"
    bucket_size: int | None = None
    n_bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0

    input: ClassVar[str] = "documents"

    def __post_init__(self):
        check(self.bucket_size is None or self.bucket_size >= 1, "protocol.bucket_size",
              f"must be >= 1, got {self.bucket_size}")
        check(self.n_bootstrap >= 0, "protocol.n_bootstrap", f"must be >= 0, got {self.n_bootstrap}")
        check(0 < self.confidence < 1, "protocol.confidence", f"must be in (0, 1), got {self.confidence}")

    def with_bucket_size(self, size: int) -> Protocol:
        return self if self.bucket_size is not None else dataclasses.replace(self, bucket_size=size)

    def score(
        self, nll_fn: NllFn, data, length: int, *, bos_id: int | None = None, batch_size: int = 1
    ) -> ProtocolScore:
        """Score ``data`` (documents of at least ``length`` tokens) at ``length``."""
        check_length(length)
        docs = as_documents(data)
        position_nll, doc_nll = document_nll(nll_fn, docs, length, batch_size)
        point = point_score(position_nll, len(docs), self.bucket_size or length)
        low = high = None
        if self.n_bootstrap > 0:
            low, high = bootstrap_interval(doc_nll.numpy(), length - 1, self.n_bootstrap, self.confidence, self.seed)
        return dataclasses.replace(
            point, protocol=self.name, ppl_low=None if low is None else power(math.e, low),
            ppl_high=None if high is None else power(math.e, high),
            confidence=self.confidence if self.n_bootstrap > 0 else None,
        )


def bootstrap_interval(
    doc_nll: np.ndarray, tokens_per_doc: int, n_bootstrap: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of the token-weighted mean NLL, resampling documents with replacement.

    Args:
        doc_nll: ``[n_docs]`` summed NLL per document.
        tokens_per_doc: scored predictions per document (equal for all, so a resample's mean is its sum / count).

    Returns:
        ``(low, high)`` mean NLL (nats) at quantiles ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``.
    """
    rng = np.random.default_rng(seed)
    n = len(doc_nll)
    picks = rng.integers(0, n, size=(n_bootstrap, n))
    means = doc_nll[picks].sum(axis=1) / (n * tokens_per_doc)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)
