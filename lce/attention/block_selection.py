"""Query-aware block selection: the machinery shared by ``moba``, ``topk_blocks`` and ``nsa``.

The keys are cut into blocks of ``block_size`` positions. Each query scores the blocks it may choose, a few blocks are
forced (its own block, the one or two before it, the first block), and the ``top_k`` highest form its selection
(forced ones included); it then attends, with one softmax, to the causal keys of its selected blocks
(``lce.kernels.selected_attention``). The scoring rule is the variant's:

- MoBA (``moba``): ``q·mean(K_b)``, the query against the block's mean key (Lu et al. 2025, arXiv:2502.13189, eq. 5-6);
- Quest (``topk_blocks``): ``Σ_d max(q_d M_bd, q_d m_bd)`` with ``M_b``/``m_b`` the block's element-wise key maximum
  and minimum, an upper bound on every ``q·k_j`` of the block (Tang et al. 2024, arXiv:2406.10774, §3.2);
- NSA (``nsa``): the compressed branch's attention probabilities summed over each selection block and over the query
  heads of a GQA group (Yuan et al. 2025, arXiv:2502.11089, eq. 8-10).

Eligible blocks are those at or before the query's own block (``b <= pos // block_size``): later blocks hold only
future keys. A query never chooses among partially filled past blocks: its own block is the only one that can be
partial, and it is always forced, so a block's summary (mean, bounds) is only ever read once the block is complete,
and prefill and token-by-token decoding select the same blocks.

The choice itself (``torch.topk`` of the scores) is not differentiable, as in the papers: gradients flow through the
attention over the chosen keys (and, for NSA, through the compressed branch that scores them), not through which blocks
were chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lce.attention.base import AttentionVariant, select_layers
from lce.attention.linear import key_validity
from lce.config import check
from lce.core.plan import LayerAttention
from lce.errors import LceError
from lce.kernels.selected_attention import selected_attention


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def choose_blocks(scores: torch.Tensor, q_pos: torch.Tensor, block_size: int, top_k: int, first_blocks: int = 0,
                  local_blocks: int = 1) -> torch.Tensor:
    """The ``top_k`` blocks each query selects.

    Args:
        scores: ``[B, HS, C, nB]`` block scores of ``C`` queries (any real values; only eligible blocks are read).
        q_pos: ``[B, C]`` the queries' positions.
        block_size: positions per block.
        top_k: blocks per query, forced ones included.
        first_blocks: leading blocks always selected (NSA's initial block).
        local_blocks: blocks always selected ending at the query's own (1: its own block, MoBA; 2: NSA's local
            blocks).

    Returns:
        int64 ``[B, HS, C, min(top_k, nB)]`` block numbers; ``-1`` where a query has fewer eligible blocks.
    """
    blocks = scores.shape[-1]
    own = torch.div(q_pos, block_size, rounding_mode="floor")[:, None, :, None]  # [B, 1, C, 1]
    b = torch.arange(blocks, device=scores.device)
    eligible = b <= own
    forced = eligible & ((b > own - local_blocks) | (b < first_blocks))
    ranked = scores.float().masked_fill(~eligible, float("-inf")).masked_fill(forced, float("inf"))
    values, index = torch.topk(ranked, min(top_k, blocks), dim=-1)
    return index.masked_fill(values == float("-inf"), -1)


def block_view(key: torch.Tensor, block_size: int, fill: float = 0.0) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B, H, nB, block_size, D]`` (fp32), the partial last block padded with ``fill``."""
    batch, heads, length, dim = key.shape
    blocks = num_blocks(length, block_size)
    padded = torch.nn.functional.pad(key.float(), (0, 0, 0, blocks * block_size - length), value=fill)
    return padded.view(batch, heads, blocks, block_size, dim)


def block_means(key: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[B, H, nB, D]`` fp32: the mean key of each block (of the keys it has, for a partial last block)."""
    length = key.shape[2]
    counts = torch.full((num_blocks(length, block_size),), float(block_size), device=key.device)
    counts[-1] = length - (counts.numel() - 1) * block_size
    return block_view(key, block_size).sum(-2) / counts[:, None]


def block_bounds(key: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, H, nB, D], [B, H, nB, D])`` fp32: the element-wise maximum and minimum key of each block."""
    return (block_view(key, block_size, float("-inf")).amax(-2),
            block_view(key, block_size, float("inf")).amin(-2))


def check_unpadded(method: str, attention_mask: torch.Tensor | None, k_pos: torch.Tensor) -> None:
    """Blocks are cut on key positions ``0, 1, ...``: a padded batch or keys that do not start at 0 are refused."""
    valid = key_validity(attention_mask, k_pos.shape[1])
    if valid is not None and not bool(valid.all()):
        raise LceError(f"attention={method} cuts keys into blocks by position and does not take padded batches; "
                       "run unpadded sequences (batch size 1 or equal lengths)")
    expected = torch.arange(k_pos.shape[1], device=k_pos.device)
    if not bool((k_pos == expected).all()):
        raise LceError(f"attention={method} needs key positions 0, 1, ..., T-1 (one sequence per row, no packed "
                       "documents or skipped positions)")


#: Queries whose block scores are formed at once (``[B, H, SCORE_CHUNK, nB]`` fp32 at a time).
SCORE_CHUNK = 256


def select_blocks(score, query: torch.Tensor, summaries, q_pos: torch.Tensor, block_size: int, top_k: int,
                  first_blocks: int = 0, local_blocks: int = 1) -> torch.Tensor:
    """``choose_blocks`` over all queries, ``SCORE_CHUNK`` at a time: ``score(query_chunk, summaries) -> [B, HS, C,
    nB]``; returns int64 ``[B, HS, Tq, min(top_k, nB)]``. No gradient (the choice is not differentiable)."""
    with torch.no_grad():
        chosen = [choose_blocks(score(query[:, :, start:start + SCORE_CHUNK], summaries),
                                q_pos[:, start:start + SCORE_CHUNK], block_size, top_k, first_blocks, local_blocks)
                  for start in range(0, query.shape[2], SCORE_CHUNK)]
    return torch.cat(chosen, dim=2)


class SelectedBlocksAttention(LayerAttention):
    """One layer's attention under a ``BlockSelection`` variant: score, choose, attend (any ``Tq``: training,
    prefill, decoding over the cached keys)."""

    def __init__(self, variant: BlockSelection):
        self.variant = variant

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout, *, q_pos, k_pos, **kwargs):
        variant = self.variant
        check_unpadded(variant.name, attention_mask, k_pos)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        summaries = variant.summaries(key.detach(), query.shape[1])
        chosen = select_blocks(variant.score, query.detach(), summaries, q_pos, variant.block_size, variant.top_k,
                               first_blocks=variant.initial_blocks)
        out = selected_attention(query, key, value, chosen, variant.block_size, scale, q_pos)
        return out.transpose(1, 2), None


@dataclass(frozen=True)
class BlockSelection(AttentionVariant):
    """Base of the variants where each query attends to its own block and the ``top_k - 1`` earlier blocks it scores
    highest; subclasses define the block summaries and the score.

    Attributes:
        block_size: keys per block.
        top_k: blocks per query, its own included (>= 1; 1 is block-diagonal attention).
        initial_blocks: leading blocks every query also selects, counted in ``top_k`` (0: the papers; 1 keeps the
            attention sink, the first tokens most heads attend to, StreamingLLM's observation).
    """

    block_size: int = 64
    top_k: int = 8
    initial_blocks: int = 0

    def __post_init__(self):
        super().__post_init__()
        check(isinstance(self.block_size, int) and self.block_size >= 1, "attention.block_size",
              f"must be an integer >= 1, got {self.block_size!r}")
        check(isinstance(self.top_k, int) and self.top_k >= 1, "attention.top_k",
              f"must be an integer >= 1 (the query's own block counts), got {self.top_k!r}")
        check(isinstance(self.initial_blocks, int) and 0 <= self.initial_blocks < self.top_k,
              "attention.initial_blocks",
              f"must be an integer from 0 to top_k - 1 = {self.top_k - 1} (the query's own block takes a slot), got "
              f"{self.initial_blocks!r}")
        check(self.layers != [], "attention.layers", "selects no layer; list at least one index")

    def apply(self, target) -> None:
        chosen = set(select_layers(self.layers, target.config.num_hidden_layers))
        target.compute_attention(self.name, lambda index, module: SelectedBlocksAttention(self)
                                 if index in chosen else None)

    def summaries(self, key: torch.Tensor, heads: int):
        """What the score reads of the keys ``[B, HKV, Tk, D]``, per query head (block means, bounds)."""
        raise NotImplementedError

    def score(self, query: torch.Tensor, summaries) -> torch.Tensor:
        """Block scores ``[B, H, C, nB]`` of the queries ``[B, H, C, D]``."""
        raise NotImplementedError
