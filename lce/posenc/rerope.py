"""ReRoPE: rectified rotary position embedding (Su 2023, https://kexue.fm/archives/9708; code: bojone/rerope
``rerope_patch.py``, copied as ``scaled_rope/LlamaReRoPE.py`` in jquesnelle/yarn; YaRN paper arXiv:2309.00071 §2.4).

RoPE logits depend on the relative position ``i - j`` only. ReRoPE clips it at a window ``w``::

    r(i, j) = min(i - j, w),    score(i, j) = q_i . R(r(i, j)) k_j * scaling    (R the RoPE rotation; j <= i)

so a query never sees a relative position larger than ``w``, whatever the sequence length: positions within the
window are exact (local order intact), everything farther looks "w tokens away". As in the reference code this is two
RoPE score matrices merged before one softmax (``lce.core.segments``):

- near (``i - j < w``): query rotated at ``i``, key at ``j``;
- far (``i - j >= w``): query rotated at ``w``, key at ``0`` (unrotated), relative position ``w``.

The reference also multiplies queries by ``max(1, ln(i + 1) / ln(L))`` (log-n, ``L`` = training length, 4096 there);
lce's ``logn`` field is exactly that formula, and it defaults to **true** here to match the original. ``logn: false``
gives the bare clipped positions; ``logn_length: null`` takes ``L`` from the model config. The reference uses
``window = 512`` with ``training_length = 4096`` (``rerope_patch.py``; its README results use ``w = 1024``).

Keys are cached unrotated (rotation happens inside attention), so prefill + decode equals one full forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lce.config import check
from lce.core.segments import SegmentLayer
from lce.kernels.attention.spec import IDENTITY, PairSelect, PositionMap, Segment
from lce.kernels.rope import Rotation
from lce.posenc.base import POSENCS, SegmentMethod


def rerope_segments(window: int) -> tuple[Segment, ...]:
    """The two segments of ReRoPE with window ``w``: near pairs (``i - j < w``) at true positions; far pairs with the
    query at ``w`` and the key at 0, so every distance beyond the window reads as ``w``."""
    return (
        Segment(IDENTITY, IDENTITY, PairSelect(hi=window)),
        Segment(PositionMap.constant(window), PositionMap.constant(0), PairSelect(lo=window)),
    )


def rerope_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rotation: Rotation,
                     q_pos: torch.Tensor, k_pos: torch.Tensor, scaling: float, window: int,
                     attention_mask: torch.Tensor | None = None, block_size: int = 1024,
                     visible=None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention with relative positions clipped at ``window``.

    Args:
        query: ``[B, H, Tq, D]`` unrotated (log-n scaled if enabled); key, value: ``[B, HKV, Tk, D]`` unrotated.
        rotation: the model's rotary embedding.
        q_pos, k_pos: ``[B, Tq]``, ``[B, Tk]`` absolute positions.
        scaling: softmax scale; window: ``w``; attention_mask: ``[B, 1, Tq, Tk]`` boolean or None (plain causal);
        block_size: query rows scored at once; visible: an attention variant's sparsity pattern, or None;
        softcap: the model's attention-logit soft-cap (Gemma 2), or None.

    Returns:
        ``[B, Tq, H, D]``.
    """
    layer = SegmentLayer("rerope", rerope_segments(window), rotation, block_size=block_size)
    return layer.attend(query, key, value, q_pos, k_pos, scaling, attention_mask, visible, softcap)


@POSENCS.register("rerope")
@dataclass(frozen=True)
class ReRope(SegmentMethod):
    """ReRoPE in every layer.

    Attributes:
        window: ``w``, the largest relative position any (query, key) pair sees.
        block_size: query rows scored at once (memory ``O(B * H * block_size * T)``).
        logn: log-n query scaling, on by default as in the reference implementation.
    """

    name: str = "rerope"
    window: int = 512
    block_size: int = 1024
    logn: bool = True

    def __post_init__(self):
        super().__post_init__()
        check(self.window >= 1, "posenc.window", f"must be >= 1 (the clipping distance), got {self.window}")
        check(self.block_size >= 1, "posenc.block_size", f"must be >= 1, got {self.block_size}")

    def segments(self, pretraining_length: int) -> tuple[Segment, ...]:
        return rerope_segments(self.window)
