"""Query-aware top-k block selection at inference, Quest-style (Tang et al. 2024, "Quest: Query-Aware Sparsity for
Efficient Long-Context LLM Inference", arXiv:2406.10774, §3.2-3.3).

Each block of ``block_size`` keys is summarised by its element-wise key maximum ``M`` and minimum ``m``; a query
``q`` bounds every score of the block from above by (Quest's criticality estimate)::

    u_b = Σ_d max(q_d M_bd, q_d m_bd) = q⁺·M_b + q⁻·m_b   >=   max_{j ∈ b} q·k_j      (q⁺ = max(q, 0), q⁻ = min(q, 0))

and attends, with one softmax, to its own block and the ``top_k - 1`` earlier blocks with the highest bound (per
query head). Quest selects pages this way while decoding and keeps the prefill dense; lce selects for every query
(prefill included), so that perplexity measures the selection and prefill + decoding equals the full forward. Quest
keeps the first two layers dense: ``attention.layers: all_but_first:2``. With ``top_k`` at least the number of blocks
it is full causal attention exactly. ``initial_blocks`` (default 0) also forces the first block(s), the attention
sink, into every selection. No parameters: a training-free swap (it can still be fine-tuned through).
Quest's defaults: pages of 16 tokens and a token budget of 1024-4096 (``top_k * block_size``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lce.attention.base import ATTENTIONS
from lce.attention.block_selection import BlockSelection, block_bounds, choose_blocks
from lce.kernels.selected_attention.reference import repeat_heads, selected_attention_reference


def quest_scores(query: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Quest's upper bound ``q⁺·M + q⁻·m`` in fp32: ``query [B, H, C, D]``, ``bounds`` (``[B, H, nB, D]`` each) ->
    ``[B, H, C, nB]``."""
    high, low = bounds
    q = query.float()
    return q.clamp(min=0) @ high.transpose(-1, -2) + q.clamp(max=0) @ low.transpose(-1, -2)


def topk_blocks_reference(query, key, value, block_size: int, top_k: int, scale: float, q_pos=None,
                          initial_blocks: int = 0):
    """Reference: the bound of every (query, block) as Quest writes it, ``Σ_d max(q_d M_bd, q_d m_bd)``, materialised
    ``[B, H, Tq, nB, D]``, then the selection and attention (arguments and result as
    ``lce.kernels.selected_attention.selected_attention_reference``)."""
    tq, tk = query.shape[2], key.shape[2]
    if q_pos is None:
        q_pos = torch.arange(tk - tq, tk, device=query.device)[None].expand(query.shape[0], tq)
    high, low = (repeat_heads(bound, query.shape[1]) for bound in block_bounds(key, block_size))
    q = query.float()[:, :, :, None, :]
    bound = torch.maximum(q * high[:, :, None], q * low[:, :, None]).sum(-1)
    chosen = choose_blocks(bound, q_pos, block_size, top_k, first_blocks=initial_blocks)
    return selected_attention_reference(query, key, value, chosen, block_size, scale, q_pos)


@ATTENTIONS.register("topk_blocks")
@dataclass(frozen=True)
class TopKBlocks(BlockSelection):
    """Quest-style selection: each query attends to its own block and the ``top_k - 1`` earlier blocks with the
    highest upper bound on its scores (per query head).

    Attributes:
        block_size: keys per block (Quest's page: 16; with the Triton kernels a power of two >= 16).
        top_k: blocks per query, the current one included (token budget ``top_k * block_size``).
    """

    name: str = "topk_blocks"
    block_size: int = 16
    top_k: int = 64

    def summaries(self, key: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(repeat_heads(bound, heads) for bound in block_bounds(key, self.block_size))

    def score(self, query: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return quest_scores(query, bounds)
