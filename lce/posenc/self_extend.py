"""Self-Extend (Jin et al. 2024, "LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning",
arXiv:2401.01325, §3; reference code ``datamllab/LongLM: self_extend_patch/Llama.py``).

Two attention segments share one softmax (``lce.core.segments.segmented_attention``), chosen by the distance
``i - j`` of query ``i`` and key ``j``:

- neighbor attention, ``i - j < W``: normal RoPE positions, so nearby tokens keep exact relative distances;
- grouped attention, ``i - j >= W``: positions are floor-divided by the group size ``G``, and queries are shifted so
  the two segments meet at distance ``W``:

      q_g = floor(i / G) + W - floor(W / G),    k_g = floor(j / G),
      relative distance  floor(i / G) - floor(j / G) + W - floor(W / G).

Grouped distances grow ``G`` times slower than true ones, so a model pre-trained on ``L`` tokens sees distances
below ``L`` up to the length ``(L - W) * G + W`` (``self_extend_max_length``; Llama-2, ``W = 1024``, ``G = 8``:
25 600). When ``G`` divides ``W`` (every published setting) that bound is exact: the largest distance at that length
is ``L - 1`` and one more token reaches ``L``; the grouped distance at ``i - j = W`` is then exactly ``W``.

Differences from the reference code, none of which changes a result it produces:
- its eager path uses ``W - W / G`` (a float when ``G`` does not divide ``W``; its flash decode path uses ``W // G``);
  lce uses ``floor(W / G)`` for both, so positions stay integers;
- it drops the shift when every query is below ``W`` (``_re_group_size_2``); then no pair is grouped, so lce keeps it;
- its optional ``scale_base`` query scaling ``clip(log(i + 1) / log(scale_base), min=1)`` is lce's log-n scaling:
  ``logn: true``, ``logn_length: <scale_base>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lce.config import check
from lce.core.segments import SegmentLayer
from lce.kernels.attention.spec import IDENTITY, PairSelect, PositionMap, Segment
from lce.kernels.rope import Rotation
from lce.posenc.base import POSENCS, SegmentMethod


def self_extend_max_length(pretraining_length: int, neighbor_window: int, group_size: int) -> int:
    """``(L - W) * G + W``: the longest input whose grouped distances stay within ``L`` (paper §3, README)."""
    return (pretraining_length - neighbor_window) * group_size + neighbor_window


def self_extend_segments(group_size: int, neighbor_window: int) -> tuple[Segment, ...]:
    """The neighbor pairs (``i - j < W``) at true positions and the grouped pairs (``i - j >= W``) with the query at
    ``i // G + W - W // G`` and the key at ``j // G``."""
    shift = neighbor_window - neighbor_window // group_size
    return (
        Segment(IDENTITY, IDENTITY, PairSelect(hi=neighbor_window)),
        Segment(PositionMap(div=group_size, add=shift), PositionMap(div=group_size), PairSelect(lo=neighbor_window)),
    )


def self_extend_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group_size: int,
    neighbor_window: int,
    rotation: Rotation,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    block_size: int = 1024,
    visible=None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Self-Extend attention: neighbor and grouped logits merged before one softmax.

    Args:
        query: ``[B, H, Tq, D]`` unrotated queries.
        key, value: ``[B, HKV, Tk, D]`` unrotated keys and values.
        group_size: ``G``.
        neighbor_window: ``W``.
        rotation: the model's rotary embedding.
        q_pos, k_pos: ``[B, Tq]``, ``[B, Tk]`` absolute positions.
        scaling: softmax scale (``1/sqrt(D)``).
        attention_mask: ``[B, 1, Tq, Tk]`` boolean (True = may attend) or None.
        block_size: query rows scored at once.
        visible: an attention variant's sparsity pattern (``lce.core.plan.Restriction``), or None.
        softcap: the model's attention-logit soft-cap (Gemma 2), or None.

    Returns:
        ``[B, Tq, H, D]``.
    """
    layer = SegmentLayer("self_extend", self_extend_segments(group_size, neighbor_window), rotation,
                         block_size=block_size)
    return layer.attend(query, key, value, q_pos, k_pos, scaling, attention_mask, visible, softcap)


@POSENCS.register("self_extend")
@dataclass(frozen=True)
class SelfExtend(SegmentMethod):
    """Self-Extend grouped attention.

    Attributes:
        group_size: ``G`` (the code's ``group_size_1``), the factor grouped distances shrink by.
        neighbor_window: ``W`` (the code's ``group_size_2``), distances below it keep exact RoPE positions; must be
            below the model's training length ``L`` (``max_position_embeddings``).
    """

    name: str = "self_extend"
    group_size: int = 8
    neighbor_window: int = 1024

    def __post_init__(self):
        super().__post_init__()
        check(self.group_size >= 1, "posenc.group_size", f"must be >= 1, got {self.group_size}")
        check(self.neighbor_window >= 1, "posenc.neighbor_window", f"must be >= 1, got {self.neighbor_window}")

    def check_length(self, pretraining_length: int) -> None:
        """``W`` must be below the training length ``L`` (grouped distances start at ``W``)."""
        check(self.neighbor_window < pretraining_length, "posenc.neighbor_window",
              f"must be smaller than the training length L = {pretraining_length} (max_position_embeddings), "
              f"got {self.neighbor_window}")

    def segments(self, pretraining_length: int) -> tuple[Segment, ...]:
        return self_extend_segments(self.group_size, self.neighbor_window)

    def max_length(self, pretraining_length: int) -> int:
        """``(L - W) * G + W`` for this configuration."""
        return self_extend_max_length(pretraining_length, self.neighbor_window, self.group_size)

    def layer(self, pretraining_length: int) -> SegmentLayer:
        self.check_length(pretraining_length)
        return super().layer(pretraining_length)
