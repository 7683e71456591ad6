"""MoBA: Mixture of Block Attention (Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs",
arXiv:2502.13189; reference: MoonshotAI/MoBA ``moba/moba_naive.py``).

Keys are cut into blocks of ``block_size``. Each query ``q_t`` (per head) gates the blocks by their mean key
(eq. 5-6)::

    s_b = q_t · mean(K_b),    selected = the current block + the top_k - 1 highest s_b among earlier blocks

and attends with one softmax to the selected blocks' keys, causally inside the current block (eq. 2-3). Future
blocks are never selected; the current block is always (the paper's causality rules, §2.2). With ``top_k`` at least
the number of blocks, every earlier block is selected: full causal attention exactly.

As in the MoBA repository the gate uses the queries and keys the attention uses (after the model's rotary embedding),
is formed in fp32, and selects per query head (a GQA model's KV heads are shared by their query heads' selections).
The paper's defaults for training: ``block_size`` 512 and ``top_k`` 3 at 8k-32k; its continual-training recipe keeps
the last layers full (``attention.layers`` selects the MoBA layers). ``initial_blocks`` (not in the paper, default 0)
also forces the first block(s), the attention sink, into every selection. No parameters are added: a swapped model is
the pretrained one with a sparser attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lce.attention.base import ATTENTIONS
from lce.attention.block_selection import BlockSelection, block_means, choose_blocks
from lce.kernels.selected_attention.reference import repeat_heads, selected_attention_reference


def moba_scores(query: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """MoBA's gate ``s = q · mean(K_b)`` in fp32: ``query [B, H, C, D]``, ``means [B, H, nB, D]`` ->
    ``[B, H, C, nB]``."""
    return query.float() @ means.transpose(-1, -2)


def moba_reference(query, key, value, block_size: int, top_k: int, scale: float, q_pos=None, initial_blocks: int = 0):
    """Reference: MoBA with the whole gate ``[B, H, Tq, nB]`` and scores materialised (arguments and result as
    ``lce.kernels.selected_attention.selected_attention_reference``; ``initial_blocks`` as ``MoBA``'s)."""
    tq, tk = query.shape[2], key.shape[2]
    if q_pos is None:
        q_pos = torch.arange(tk - tq, tk, device=query.device)[None].expand(query.shape[0], tq)
    means = repeat_heads(block_means(key, block_size), query.shape[1])
    chosen = choose_blocks(moba_scores(query, means), q_pos, block_size, top_k, first_blocks=initial_blocks)
    return selected_attention_reference(query, key, value, chosen, block_size, scale, q_pos)


@ATTENTIONS.register("moba")
@dataclass(frozen=True)
class MoBA(BlockSelection):
    """MoBA: each query attends to its own block and the ``top_k - 1`` earlier blocks whose mean key it scores
    highest (per query head).

    Attributes:
        block_size: keys per block (the paper: 512; with the Triton kernels a power of two >= 16).
        top_k: blocks per query, the current one included (the paper: 3).
    """

    name: str = "moba"
    block_size: int = 512
    top_k: int = 3

    def summaries(self, key: torch.Tensor, heads: int) -> torch.Tensor:
        return repeat_heads(block_means(key, self.block_size), heads)

    def score(self, query: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        return moba_scores(query, means)
