"""Attention sinks / StreamingLLM (Xiao et al. 2024, arXiv:2309.17453, §3.2 "Rolling KV cache with attention sinks";
code: mit-han-lab/streaming-llm ``streaming_llm/kv_cache.py`` and ``streaming_llm/pos_shift/modify_llama.py``).

StreamingLLM keeps the KV entries of the first ``start_size`` tokens (the sinks) and of the most recent tokens, and
assigns RoPE positions by place *in the cache* rather than in the text ("pos-shift", paper §3.2: "positions within the
cache"), so relative positions never exceed the cache size. With ``S = start_size`` and ``R = recent_size`` (the
recent window, counting the current token), query ``i`` sees key ``j`` iff::

    j < S   or   i - j < R

and its relative position is the cache-local one:

- recent keys (``i - j < R``): ``i - j`` (query and key rotated at their true positions);
- sink keys beyond the window (``j < S``, ``i - j >= R``): the cache holds ``S + R`` entries, the query is the last
  one, so it sits at ``S + R - 1`` and the sink at ``j``: relative position ``S + R - 1 - j``. Before the cache fills
  (``i < S + R - 1``) nothing has been evicted and true positions are cache positions, hence ``q_map = min(i, S+R-1)``.

These are two segments of ``lce.core.segments`` plus the visibility rule (pairs neither segment selects are
masked). A full forward with this mask gives exactly what token-by-token streaming with an evicting, pos-shifted cache
gives, because every layer's state of every token was computed under the same visibility. lce does not evict: the
KV cache keeps every token (memory ``O(T)``), but each query block only scores the keys it may see, so compute is
``O(T * (S + R + block_size))``.

Cache-size conventions: the streaming-llm eval loop (``examples/eval_long_ppl.py``) prunes the cache to
``start + recent`` *after* each step, so the current token is an extra entry: its ``--recent_size r`` is lce's
``recent_size = r + 1``. Defaults here are the paper's 4 + 1020 (cache 1024; ``attention_sinks`` uses the same
4/1020); alternatives: paper 4 + 2044, chat demo 4 + 2000 (``run_streaming_llama.py``), PPL script 1 + 255
(``streaming_llm/utils.py``). ``start_size = 0`` is a pos-shifted sliding window without sinks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lce.config import check
from lce.core.plan import SOFTCAP
from lce.core.segments import SegmentLayer
from lce.kernels.attention.spec import IDENTITY, PairSelect, PositionMap, Segment
from lce.kernels.rope import Rotation
from lce.posenc.base import POSENCS, SegmentMethod


def sink_segments(start_size: int, recent_size: int) -> tuple[Segment, ...]:
    """Recent pairs (``i - j < R``) at true positions; sink keys (``j < S``) beyond the window with the query at its
    cache position ``min(i, S + R - 1)`` (pairs neither selects are hidden)."""
    return (
        Segment(IDENTITY, IDENTITY, PairSelect(hi=recent_size)),
        Segment(PositionMap(cap=start_size + recent_size - 1), IDENTITY, PairSelect(lo=recent_size,
                                                                                    key_below=start_size)),
    )


def sinks_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rotation: Rotation,
                    q_pos: torch.Tensor, k_pos: torch.Tensor, scaling: float, start_size: int, recent_size: int,
                    attention_mask: torch.Tensor | None = None, block_size: int = 1024,
                    softcap: float | None = None) -> torch.Tensor:
    """StreamingLLM attention (sinks + recent window, cache-local positions).

    Each block of queries is scored against the key columns some query of the block may see (the sinks and the
    union of the block's windows) only; the others would get probability 0 anyway.

    Args:
        query: ``[B, H, Tq, D]`` unrotated; key, value: ``[B, HKV, Tk, D]`` unrotated.
        rotation: the model's rotary embedding.
        q_pos, k_pos: ``[B, Tq]``, ``[B, Tk]`` absolute positions.
        scaling: softmax scale; start_size, recent_size: ``S``, ``R``;
        attention_mask: ``[B, 1, Tq, Tk]`` boolean or None (plain causal); block_size: query rows scored at once;
        softcap: the model's attention-logit soft-cap (Gemma 2), or None.

    Returns:
        ``[B, Tq, H, D]``.
    """
    layer = SegmentLayer("sinks", sink_segments(start_size, recent_size), rotation, block_size=block_size,
                         window=recent_size, sink_tokens=start_size)
    return layer.attend(query, key, value, q_pos, k_pos, scaling, attention_mask, softcap=softcap)


@POSENCS.register("sinks")
@dataclass(frozen=True)
class Sinks(SegmentMethod):
    """StreamingLLM attention sinks with pos-shift in every layer.

    Attributes:
        start_size: ``S``, number of initial tokens every query keeps (the attention sinks).
        recent_size: ``R``, the recent window including the current token.
        block_size: query rows scored at once.
    """

    name: str = "sinks"
    start_size: int = 4
    recent_size: int = 1020
    block_size: int = 1024

    def __post_init__(self):
        super().__post_init__()
        check(self.start_size >= 0, "posenc.start_size", f"must be >= 0, got {self.start_size}")
        check(self.recent_size >= 1, "posenc.recent_size",
              f"must be >= 1 (the window includes the current token), got {self.recent_size}")
        check(self.block_size >= 1, "posenc.block_size", f"must be >= 1, got {self.block_size}")

    def segments(self, pretraining_length: int) -> tuple[Segment, ...]:
        return sink_segments(self.start_size, self.recent_size)

    def layer(self, pretraining_length: int) -> SegmentLayer:
        # The recent window and the sinks are the method's own pattern: each block reads only the keys they reach, and
        # the fused kernel skips the key tiles neither segment can select (the segments alone would be exact, but
        # scan every earlier key). A variant's restriction on top is refused (no RESTRICTION among what it handles).
        return dataclasses.replace(super().layer(pretraining_length), window=self.recent_size,
                                   sink_tokens=self.start_size, handles=frozenset({SOFTCAP}))
