"""Sliding-window attention with optional attention sinks.

Each query ``i`` sees the ``window`` most recent keys, itself included, and the first ``sink_tokens`` tokens::

    visible(i, j) = j <= i and (i - j < window or j < sink_tokens)

The window is local attention as in Longformer (Beltagy et al. 2020, arXiv:2004.05150, §3.1 "Sliding Window") and
Mistral 7B (arXiv:2310.06825, §2; transformers' ``sliding_window`` counts the current token the same way); the sinks
are StreamingLLM's (Xiao et al. 2024, arXiv:2309.17453, §3.2), without its cache-local re-positioning: keys keep their
true positions, so this pattern composes with any position encoding (``posenc=sinks`` is the pos-shifted original).

lce's block-wise attention scores each block of ``query_block`` queries against the sinks and the ``window +
query_block - 1`` keys before it only: ``O(T * (window + sinks + query_block))`` time and memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lce.attention.base import ATTENTIONS
from lce.attention.sparse import SparseVariant
from lce.config import check
from lce.core.plan import KeyRanges, Restriction


@dataclass(frozen=True)
class SlidingWindowPattern(Restriction):
    """``i - j < window`` or ``0 <= j < sink_tokens``."""

    window: int
    sink_tokens: int = 0
    query_block: int = 128

    def visible(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        ok = i - j < self.window
        if self.sink_tokens:
            ok = ok | ((j >= 0) & (j < self.sink_tokens))
        return ok

    def key_ranges(self, q_lo: int, q_hi: int) -> KeyRanges:
        return [(0, self.sink_tokens), (q_lo - self.window + 1, q_hi + 1)]

    def kernel_pattern(self, max_position: int) -> dict:
        return {"window": self.window, "sink_tokens": self.sink_tokens}


@ATTENTIONS.register("sliding_window")
@dataclass(frozen=True)
class SlidingWindow(SparseVariant):
    """Sliding-window attention.

    Attributes:
        window: keys each query sees, itself included (``W``; >= the sequence length is full causal attention).
        sink_tokens: leading tokens every query also sees (attention sinks; 0 = none).
    """

    name: str = "sliding_window"
    window: int = 4096
    sink_tokens: int = 0

    def __post_init__(self):
        super().__post_init__()
        check(self.window >= 1, "attention.window", f"must be >= 1 (it counts the query itself), got {self.window}")
        check(self.sink_tokens >= 0, "attention.sink_tokens", f"must be >= 0, got {self.sink_tokens}")

    def pattern(self, target) -> SlidingWindowPattern:
        return SlidingWindowPattern(self.window, self.sink_tokens, self.query_block)
