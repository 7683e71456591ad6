"""The ``eval`` config group: which documents are scored at which lengths, and how."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lce.config import check, check_at_least


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity-vs-length sweep: each test document truncated to each length, NLL summed and divided once."""

    name: str = "default"
    lengths: list[int] = field(default_factory=lambda: [128, 256, 512, 1024, 2048])
    n_docs: int = 16
    split: Literal["validation", "test"] = "test"
    documents: Literal["long", "concat"] = "long"
    batch_size: int = 4
    bucket_size: int | None = None
    loss_chunk_size: int = 4096

    def __post_init__(self):
        check(len(self.lengths) > 0, "eval.lengths", "must list at least one length")
        for length in self.lengths:
            check(length >= 2, "eval.lengths", f"every length must be >= 2 (one prediction), got {length}")
        check(len(set(self.lengths)) == len(self.lengths), "eval.lengths", f"has duplicates: {self.lengths}")
        check_at_least(self, "eval", 1, "n_docs", "batch_size", "loss_chunk_size")
        check(self.bucket_size is None or self.bucket_size >= 1, "eval.bucket_size", f"must be >= 1, got {self.bucket_size}")
