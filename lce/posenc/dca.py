"""Dual Chunk Attention (An et al. 2024, "Training-Free Long-Context Scaling of Large Language Models",
arXiv:2402.17463, §3; reference code ``HKUNLP/ChunkLlama: chunkllama_attn_replace.py``).

DCA keeps every relative position a RoPE model sees inside its pre-training range ``c`` by rotating keys at their
position *within a chunk* and giving queries one of three position sets, chosen by how far apart the chunks of the
query ``i`` and the key ``j`` are. A pair's logit is ``R(P_q[i]) q_i . R(P_k[j]) k_j``, so its effective relative
distance is ``M[i][j] = P_q[i] - P_k[j]`` (the paper's relative position matrix, §3; Algorithm 1 in App. A):

- intra-chunk (same chunk): ``P_q = P_k`` -> ``M = i - j``, exact;
- successive-chunk (adjacent chunks): the first queries of a chunk keep exact distances to the end of the
  previous chunk, the others are clipped;
- inter-chunk (two or more chunks apart): one constant query position, so ``M`` only depends on the key.

The paper and its code place the chunks differently; ``convention`` chooses (``s`` chunk size, ``w`` local window,
``c`` pre-training length):

``code`` (ChunkLlama, the default): chunks have stride ``L = s - w``; ``P_k[j] = j mod L``; intra
``P_q = i mod L``; successive ``P_q = min(i mod L + L, s)`` (exact for the first ``w + 1`` queries of a chunk);
inter ``P_q = min(2L - 1, s)`` (ChunkLlama's ``qc_cos[chunk_len - 1]``, which is ``s`` whenever ``w < s / 2``, as
with every default). Largest effective distance: that inter position, ``s`` with the defaults (3072 for Llama-2,
``s = 3c/4``).

``paper``: chunks have stride ``s``; ``P_k[j] = j mod s``; intra ``P_q = i mod s``; successive
``P_q = s + (i mod s)`` for the first ``w`` queries of a chunk and ``c - 1`` for the rest; inter ``P_q = c - 1``.
Largest effective distance: ``c - 1``. Needs ``w <= c - s`` so that the exact successive distances stay below ``c``.

All three segments are merged under **one** softmax (``lce.core.segments.segmented_attention``), so outputs and
gradients are exact; ChunkLlama instead merges three FlashAttention outputs with log-sum-exp weights it detaches
(and casts to bf16), which drops the gradient through the normalisation.

ChunkLlama also multiplies the cos/sin of queries and keys by ``mscale = 0.05 ln(l / c) + 1`` when the length ``l``
exceeds ``c`` (logits times ``mscale^2``; ``mscale: true``). There ``l`` is the length its rotary cache was last
grown to, so every query of a forward shares one factor and cached keys keep the factor they were rotated with. lce
computes it statelessly per query from the number of keys it attends, ``l = i + 1``: a causal model (a token's logits
never depend on later tokens), decode == full forward, padding-invariant, and equal to ChunkLlama's factor for the
last token of a sequence.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from lce.config import check
from lce.core.segments import SegmentLayer
from lce.kernels.attention.spec import PairSelect, PositionMap, Segment
from lce.kernels.rope import Rotation
from lce.posenc.base import POSENCS, SegmentMethod

DcaConvention = Literal["code", "paper"]


@dataclass(frozen=True)
class DcaGeometry:
    """DCA's chunk layout with every default resolved (all lengths in tokens).

    Attributes:
        pretraining_length: ``c``.
        chunk_size: ``s``.
        local_window: ``w``.
        convention: ``code`` (ChunkLlama) or ``paper``.
    """

    pretraining_length: int
    chunk_size: int
    local_window: int
    convention: DcaConvention = "code"

    @property
    def stride(self) -> int:
        """Distance between chunk starts: ``s - w`` in the code, ``s`` in the paper."""
        return self.chunk_size - self.local_window if self.convention == "code" else self.chunk_size

    @property
    def inter_query_position(self) -> int:
        """The query position of every inter-chunk pair."""
        if self.convention == "code":
            return min(2 * self.stride - 1, self.chunk_size)
        return self.pretraining_length - 1

    @property
    def max_relative_position(self) -> int:
        """The largest effective relative distance at any length: the inter-chunk query position, ``s`` (code, when
        ``w < s/2``; ``2(s - w) - 1`` for wider windows) or ``c - 1`` (paper)."""
        return self.inter_query_position

    def segments(self) -> tuple[Segment, ...]:
        """The intra-, successive- and inter-chunk segments (keys at their offset in the chunk, ``j mod stride``).

        Code convention (ChunkLlama, stride ``L = s - w``): queries at ``i mod L`` (intra), ``min(i mod L + L, s)``
        (successive) and ``min(2L - 1, s)`` (inter). Paper convention (stride ``s``): ``i mod s`` (intra),
        ``s + (i mod s)`` for the first ``w`` queries of a chunk and ``c - 1`` for the rest (successive), ``c - 1``
        (inter)."""
        stride, s, w = self.stride, self.chunk_size, self.local_window
        in_chunk = PositionMap(mod=stride)
        if self.convention == "code":
            successive = PositionMap(mod=stride, add=stride, cap=s)
        else:
            successive = PositionMap(mod=s, add=s, below=w, otherwise=self.pretraining_length - 1)
        return (
            Segment(in_chunk, in_chunk, PairSelect(div=stride, lo=0, hi=1)),
            Segment(successive, in_chunk, PairSelect(div=stride, lo=1, hi=2)),
            Segment(PositionMap.constant(self.inter_query_position), in_chunk, PairSelect(div=stride, lo=2)),
        )


def dca_mscale(lengths: torch.Tensor, pretraining_length: int) -> torch.Tensor:
    """ChunkLlama's ``0.05 ln(l / c) + 1`` for ``l > c``, else 1 (fp32, same shape as ``lengths``)."""
    ratio = lengths.to(torch.float32) / pretraining_length
    return torch.where(ratio > 1, 0.05 * torch.log(ratio.clamp(min=1.0)) + 1.0, torch.ones_like(ratio))


def dca_query_scale(q_pos: torch.Tensor, pretraining_length: int) -> torch.Tensor:
    """The multiplier of the query at position ``i``: ``dca_mscale(i + 1, c)^2``, which scales its logits by
    ChunkLlama's temperature (``[B, Tq]`` fp32)."""
    return dca_mscale(q_pos + 1, pretraining_length) ** 2


def dca_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    geometry: DcaGeometry,
    rotation: Rotation,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    mscale: bool = True,
    block_size: int = 1024,
    visible=None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Dual chunk attention with one softmax over the three segments.

    Args:
        query: ``[B, H, Tq, D]`` unrotated queries.
        key, value: ``[B, HKV, Tk, D]`` unrotated keys and values.
        geometry: the resolved chunk layout.
        rotation: the model's rotary embedding.
        q_pos, k_pos: ``[B, Tq]``, ``[B, Tk]`` absolute positions.
        scaling: softmax scale (``1/sqrt(D)``).
        attention_mask: ``[B, 1, Tq, Tk]`` boolean (True = may attend) or None.
        mscale: multiply the logits of the query at position ``i`` by ``dca_mscale(i + 1, c)^2``.
        block_size: query rows scored at once.
        visible: an attention variant's sparsity pattern (``lce.core.plan.Restriction``), or None.
        softcap: the model's attention-logit soft-cap (Gemma 2), or None.

    Returns:
        ``[B, Tq, H, D]``.
    """
    scale = functools.partial(dca_query_scale, pretraining_length=geometry.pretraining_length) if mscale else None
    layer = SegmentLayer("dca", geometry.segments(), rotation, query_scale=scale, block_size=block_size)
    return layer.attend(query, key, value, q_pos, k_pos, scaling, attention_mask, visible, softcap)


@POSENCS.register("dca")
@dataclass(frozen=True)
class Dca(SegmentMethod):
    """Dual Chunk Attention; ``null`` lengths are resolved from the model config when the model is patched.

    Attributes:
        chunk_size: ``s``; None = ``3c/4`` (floor), as ChunkLlama and the paper.
        local_window: ``w``; None = ``c/8`` (floor), ChunkLlama's default (its ppl script passes ``c/4``).
        convention: ``code`` (ChunkLlama: stride ``s - w``, largest distance ``s``) or ``paper`` (stride ``s``,
            largest distance ``c - 1``); see the module docstring.
        pretraining_length: ``c``; None = the model's ``max_position_embeddings``.
        mscale: ChunkLlama's logit temperature ``(0.05 ln(l/c) + 1)^2`` for queries attending ``l > c`` keys.
    """

    name: str = "dca"
    chunk_size: int | None = None
    local_window: int | None = None
    convention: DcaConvention = "code"
    pretraining_length: int | None = None
    mscale: bool = True

    def __post_init__(self):
        super().__post_init__()
        check(self.convention in get_args(DcaConvention), "posenc.convention",
              f"must be one of {', '.join(get_args(DcaConvention))}, got {self.convention!r}")
        check(self.pretraining_length is None or self.pretraining_length >= 2, "posenc.pretraining_length",
              f"must be >= 2, got {self.pretraining_length}")
        check(self.chunk_size is None or self.chunk_size >= 1, "posenc.chunk_size",
              f"must be >= 1, got {self.chunk_size}")
        check(self.local_window is None or self.local_window >= 0, "posenc.local_window",
              f"must be >= 0, got {self.local_window}")
        if self.chunk_size is not None and self.local_window is not None:
            check(self.local_window < self.chunk_size, "posenc.local_window",
                  f"must be smaller than chunk_size = {self.chunk_size}, got {self.local_window}")
        if self.pretraining_length is not None:
            self.geometry(self.pretraining_length)

    def geometry(self, max_position_embeddings: int) -> DcaGeometry:
        """The checked layout for a model of ``max_position_embeddings`` (unused when ``pretraining_length`` is set)."""
        c = self.pretraining_length or max_position_embeddings
        s = self.chunk_size if self.chunk_size is not None else c * 3 // 4
        w = self.local_window if self.local_window is not None else c // 8
        s_from = "" if self.chunk_size is not None else " (the default 3c/4)"
        w_from = "" if self.local_window is not None else " (the default c/8)"
        check(1 <= s <= c, "posenc.chunk_size",
              f"must be between 1 and the pre-training length c = {c}, got {s}{s_from}")
        check(w < s, "posenc.local_window", f"must be smaller than chunk_size = {s}, got {w}{w_from}")
        if self.convention == "paper":
            check(s + w <= c, "posenc.local_window",
                  f"convention=paper needs local_window <= c - chunk_size = {c - s} so that successive-chunk "
                  f"distances stay below c = {c}, got {w}{w_from}")
        return DcaGeometry(c, s, w, self.convention)

    def segments(self, pretraining_length: int) -> tuple[Segment, ...]:
        return self.geometry(pretraining_length).segments()

    def geometry_for(self, config) -> DcaGeometry:
        """The layout for a model config (``c`` = its ``max_position_embeddings`` unless set)."""
        return self.geometry(int(config.max_position_embeddings))

    def layer(self, pretraining_length: int) -> SegmentLayer:
        layer = super().layer(pretraining_length)
        if not self.mscale:
            return layer
        c = self.geometry(pretraining_length).pretraining_length
        return dataclasses.replace(layer, query_scale=functools.partial(dca_query_scale, pretraining_length=c))
