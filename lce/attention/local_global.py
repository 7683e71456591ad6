"""Local + global attention: Longformer (Beltagy et al. 2020, arXiv:2004.05150, §3.1, Figure 2d).

Every query attends a sliding window of nearby keys; a few designated positions are *global*: every query attends
them, and they attend every key. In a causal language model "every" means every one that causality allows::

    visible(i, j) = j <= i and (i - j < window or j in G or i in G)

so a global token is visible to every later query, and a global query (decoding at a global position, or the
global token's own row in a forward) attends all earlier keys; it cannot see later ones, unlike the bidirectional
encoder of the paper. Longformer's window is ``w/2`` keys on each side (§3.1); the causal, autoregressive form keeps
the ``window`` keys up to and including the query, as its character-level LM does (§4). Global positions are
absolute positions (Longformer marks task tokens such as ``[CLS]`` or the question); the default ``[0]`` makes the
first token a global "sink". Longformer's per-head dilation (§3.1 "Dilated Sliding Window") is ``dilated``.

lce's block-wise attention scores a block of queries against its window and the global keys before it, or against
every earlier key when the block holds a global query: ``O(T * (window + |G| + query_block) + |G| * T)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lce.attention.base import ATTENTIONS
from lce.attention.sparse import SparseVariant
from lce.config import check
from lce.core.plan import KeyRanges, Restriction


@dataclass(frozen=True)
class LocalGlobalPattern(Restriction):
    """``i - j < window``, or ``j`` or ``i`` a global position."""

    window: int
    global_tokens: tuple[int, ...] = (0,)
    query_block: int = 128

    def visible(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        ok = i - j < self.window
        if self.global_tokens:
            positions = torch.tensor(self.global_tokens, device=i.device, dtype=i.dtype)
            ok = ok | torch.isin(j, positions) | torch.isin(i, positions)
        return ok

    def kernel_pattern(self, max_position: int) -> dict | None:
        """Global positions ``0 .. g-1`` (the default ``[0]``) are the fused kernel's sink tokens: a global key is a
        sink, and a global query ``i < g`` sees only keys ``j <= i < g``, all of them sinks. Other layouts have no
        form in the fused kernel."""
        if self.global_tokens != tuple(range(len(self.global_tokens))):
            return None
        return {"window": self.window, "sink_tokens": len(self.global_tokens)}

    def key_ranges(self, q_lo: int, q_hi: int) -> KeyRanges:
        if any(q_lo <= g <= q_hi for g in self.global_tokens):
            return [(0, q_hi + 1)]
        return [(q_lo - self.window + 1, q_hi + 1), *((g, g + 1) for g in self.global_tokens if g <= q_hi)]


@ATTENTIONS.register("local_global")
@dataclass(frozen=True)
class LocalGlobal(SparseVariant):
    """Longformer attention: sliding window plus global token positions.

    Attributes:
        window: keys of the local window, the query itself included.
        global_tokens: absolute positions of the global tokens; each must be below the model's
            ``max_position_embeddings`` (a global position the model is never trained at would never be global).
    """

    name: str = "local_global"
    window: int = 512
    global_tokens: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self):
        super().__post_init__()
        check(self.window >= 1, "attention.window", f"must be >= 1 (it counts the query itself), got {self.window}")
        bad = [g for g in self.global_tokens if not isinstance(g, int) or isinstance(g, bool) or g < 0]
        check(not bad, "attention.global_tokens", f"positions must be integers >= 0, got {bad}")
        check(len(set(self.global_tokens)) == len(self.global_tokens), "attention.global_tokens",
              f"has duplicates: {self.global_tokens}")

    def pattern(self, target) -> LocalGlobalPattern:
        length = int(target.config.max_position_embeddings)
        beyond = [g for g in self.global_tokens if g >= length]
        check(not beyond, "attention.global_tokens",
              f"positions {beyond} are out of range for a model of max_position_embeddings = {length} "
              f"(allowed 0..{length - 1})")
        return LocalGlobalPattern(self.window, tuple(sorted(self.global_tokens)), self.query_block)
