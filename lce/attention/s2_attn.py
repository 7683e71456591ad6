"""Shifted sparse attention (S²-Attn): LongLoRA (Chen et al. 2024, arXiv:2309.12307, §3.2, Figure 2, Algorithm 1).

For training only. The ``L`` tokens of a training sequence are split into groups of ``G = group_size_ratio * L``
(the paper's 1/4); half of the heads attend within the groups ``[kG, (k+1)G)``, the other half within groups shifted
by ``s = G // 2``, ``[kG + s, (k+1)G + s)``, so information flows between neighbouring groups; causal within groups::

    heads h <  H/2:  visible(i, j) = j <= i and floor(i / G) == floor(j / G)
    heads h >= H/2:  visible(i, j) = j <= i and floor((i - s) / G) == floor((j - s) / G)

In evaluation (``model.eval()``) attention is full, as in the paper ("it retains the original attention architecture
during inference"), so generation and perplexity sweeps use the model's own attention.

The shifted groups are those of LongLoRA's flash-attention path (``llama_attn_replace.py: forward_flashattn``, the
one its training scripts use): the shifted heads' cumulative sequence lengths are ``0, s, s + G, ..., L``, so their
first group holds ``s`` tokens and their last ``G - s``. The paper's Algorithm 1 and the repository's non-flash path
instead ``roll`` the shifted heads by ``-G/2`` and wrap the last ``G/2`` tokens into one group with the first
``G/2``: those first tokens then see the last ones, i.e. the future, which breaks the causal LM objective (the
authors acknowledge the leak in JIA-Lab-research/LongLoRA issues #15 and #90 and moved the flash path to the form
used here). The rolled form is not offered. Heads and groups follow LongLoRA otherwise: ``s = G // 2`` is the shift,
the first ``H // 2`` heads (after GQA's key/value heads are shared out, as its ``repeat_kv``) are unshifted, and
``L`` must be a multiple of the group count. Groups are positions (LongLoRA's varlen path groups each unpadded
sequence from its first token, which is the same).

With one group (``group_size_ratio: 1``) nothing is shifted (a shift would cut the only group in two) and attention
is full. lce computes S²-Attn with the pattern below through the layer's attention computation (block-wise, ALiBi,
DCA, ...), so it composes with position encodings; a block of queries scores about ``2G`` keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lce.attention.base import ATTENTIONS
from lce.attention.sparse import SparseVariant
from lce.config import check
from lce.core.plan import KeyRanges, Restriction
from lce.errors import LceError, UnsupportedModelError


@dataclass(frozen=True)
class ShiftedGroups(Restriction):
    """S²-Attn for one sequence length: groups of ``group_size``, heads ``[H // 2, H)`` shifted by ``group_size // 2``
    (a per-head pattern, ``[B, H, Tq, Tk]``)."""

    group_size: int
    heads: int
    query_block: int = 128

    def visible(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        size, shift = self.group_size, self.group_size // 2
        same = torch.div(i, size, rounding_mode="floor") == torch.div(j, size, rounding_mode="floor")
        shifted = torch.div(i - shift, size, rounding_mode="floor") == torch.div(j - shift, size, rounding_mode="floor")
        is_shifted = (torch.arange(self.heads, device=i.device) >= self.heads // 2)[None, :, None, None]
        return torch.where(is_shifted, shifted[:, None], same[:, None])

    def key_ranges(self, q_lo: int, q_hi: int) -> KeyRanges:
        size, shift = self.group_size, self.group_size // 2
        return [(min(q_lo // size * size, (q_lo - shift) // size * size + shift), q_hi + 1)]


@dataclass(frozen=True)
class S2Pattern(Restriction):
    """S²-Attn with ``groups`` groups per sequence, in force while the module is training."""

    groups: int
    heads: int
    query_block: int = 128

    def visible(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        raise LceError("S²-Attn's groups depend on the sequence length; take the pattern of a call with .at()")

    def at(self, module: nn.Module, kv_len: int) -> ShiftedGroups | None:
        if not module.training or self.groups == 1:
            return None
        if kv_len % self.groups:
            raise LceError(f"attention=s2_attn: the training sequence length {kv_len} must be a multiple of the "
                           f"{self.groups} groups of attention.group_size_ratio = 1/{self.groups}")
        return ShiftedGroups(kv_len // self.groups, self.heads, self.query_block)


@ATTENTIONS.register("s2_attn")
@dataclass(frozen=True)
class S2Attn(SparseVariant):
    """LongLoRA's shifted sparse attention in training, full attention in evaluation.

    Attributes:
        group_size_ratio: group size as a fraction ``1/n`` of the training sequence length (the paper's 1/4); the
            sequence length must be a multiple of ``n``.
    """

    name: str = "s2_attn"
    group_size_ratio: float = 0.25

    def __post_init__(self):
        super().__post_init__()
        ratio = self.group_size_ratio
        check(0 < ratio <= 1, "attention.group_size_ratio", f"must be in (0, 1], got {ratio}")
        check(abs(1 / ratio - round(1 / ratio)) < 1e-6, "attention.group_size_ratio",
              f"must be 1/n for an integer number of groups n (0.25 = 4 groups), got {ratio}")

    @property
    def groups(self) -> int:
        return round(1 / self.group_size_ratio)

    def pattern(self, target) -> S2Pattern:
        heads = int(target.config.num_attention_heads)
        if heads < 2:
            raise UnsupportedModelError(f"attention=s2_attn shifts half of the heads; the model has {heads} head")
        return S2Pattern(self.groups, heads, self.query_block)
