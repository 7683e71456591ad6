"""Dilated (atrous) sliding-window attention: Longformer (Beltagy et al. 2020, arXiv:2004.05150, §3.1 "Dilated
Sliding Window").

Each query sees ``window`` keys spaced ``dilation`` apart, itself included::

    visible(i, j) = j <= i and (i - j) mod dilation == 0 and (i - j) / dilation < window

so with ``L`` layers the receptive field is ``L * window * dilation`` for the cost of a window of ``window`` keys;
``dilation: 1`` is ``sliding_window``, and a window of at least ``T / dilation`` is the strided head of Sparse
Transformers (Child et al. 2019, arXiv:1904.10509, §4.2: every ``l``-th earlier position). Longformer varies the
dilation per head (no dilation on some heads to keep local context); here every head of a selected layer shares one
dilation: use ``layers`` to mix dilated and undilated layers.

lce's block-wise attention scores a block of queries against the span ``(window - 1) * dilation + query_block`` before
it and masks the holes: memory and time ``O(T * window * dilation)``, linear in ``T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lce.attention.base import ATTENTIONS
from lce.attention.sparse import SparseVariant
from lce.config import check
from lce.core.plan import KeyRanges, Restriction


@dataclass(frozen=True)
class DilatedPattern(Restriction):
    """``i - j`` a multiple of ``dilation`` below ``window * dilation``."""

    window: int
    dilation: int = 2
    query_block: int = 128

    def visible(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        distance = i - j
        return (torch.remainder(distance, self.dilation) == 0) & (distance < self.window * self.dilation)

    def key_ranges(self, q_lo: int, q_hi: int) -> KeyRanges:
        return [(q_lo - (self.window - 1) * self.dilation, q_hi + 1)]


@ATTENTIONS.register("dilated")
@dataclass(frozen=True)
class Dilated(SparseVariant):
    """Dilated sliding-window attention.

    Attributes:
        window: keys each query sees, itself included.
        dilation: distance between consecutive visible keys (1 = a plain sliding window).
    """

    name: str = "dilated"
    window: int = 512
    dilation: int = 2

    def __post_init__(self):
        super().__post_init__()
        check(self.window >= 1, "attention.window", f"must be >= 1 (it counts the query itself), got {self.window}")
        check(self.dilation >= 1, "attention.dilation", f"must be >= 1, got {self.dilation}")

    def pattern(self, target) -> DilatedPattern:
        return DilatedPattern(self.window, self.dilation, self.query_block)
