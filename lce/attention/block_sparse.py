"""Block-sparse attention: BigBird (Zaheer et al. 2020, arXiv:2007.14062, §2 and App. D "BigBird-ETC/ITC").

The sequence is cut into blocks of ``block_size`` positions (block ``p // block_size``); each query block attends a
set of key blocks, and within them every causal pair:

- window: its own block and the ``window_blocks - 1`` blocks before it (BigBird's 3 sliding blocks are one on each
  side; a causal model keeps the left ones);
- global: the first ``global_blocks`` blocks are visible to every query (BigBird-ITC's global tokens are the first
  and last blocks; only leading blocks can be global under causality, and their queries already see every earlier
  key, as global queries should);
- random: ``random_blocks`` further blocks drawn uniformly without replacement from the earlier blocks that neither
  the window nor the globals cover (all of them when there are fewer).

The random blocks of query block ``b`` are ``random.Random(seed * 2**32 + b).sample(...)``: a function of the seed
and the block's position only, never of the call, so every forward, every batch row, prefill and token-by-token
decoding see the same pattern, and any block's pattern is computed without the others (Python's seeded ``Random``
is reproducible across platforms and versions; a torch generator's stream is not guaranteed to be). BigBird draws
per layer and head (``bigbird_block_rand_mask``); here every layer and head shares the pattern of its seed.

With ``window_blocks`` or ``random_blocks`` at least the number of blocks, every block is visible: full causal
attention. lce's block-wise attention scores a block of queries against the key blocks it selects only:
``O(T * block_size * (window_blocks + global_blocks + random_blocks))``.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import torch

from lce.attention.base import ATTENTIONS
from lce.attention.sparse import SparseVariant
from lce.config import check
from lce.core.plan import KeyRanges, Restriction


@functools.lru_cache(maxsize=1 << 16)
def random_key_blocks(block: int, seed: int, window_blocks: int, global_blocks: int, count: int) -> tuple[int, ...]:
    """The random key blocks of query block ``block`` (sorted): ``count`` blocks drawn from the earlier blocks outside
    its window and the global blocks, all of them if fewer; none for a negative (padding) block."""
    eligible = range(global_blocks, block - window_blocks + 1)
    if count <= 0 or len(eligible) <= 0:
        return ()
    if count >= len(eligible):
        return tuple(eligible)
    return tuple(sorted(random.Random(seed * 2**32 + block).sample(eligible, count)))


@functools.lru_cache(maxsize=16)  # every layer and call of a forward asks for the same map
def block_map(pattern: BlockSparsePattern, blocks: int) -> torch.Tensor:
    """bool ``[blocks, blocks]``: row ``b`` marks the key blocks query block ``b`` attends."""
    block_mask = torch.zeros(blocks, blocks, dtype=torch.bool)
    for block in range(blocks):
        block_mask[block, pattern.key_blocks(block)] = True
    return block_mask


@dataclass(frozen=True)
class BlockSparsePattern(Restriction):
    """Window, global and seeded random key blocks per query block."""

    block_size: int
    window_blocks: int = 3
    global_blocks: int = 1
    random_blocks: int = 3
    seed: int = 0
    query_block: int = 128

    def random_of(self, block: int) -> tuple[int, ...]:
        return random_key_blocks(block, self.seed, self.window_blocks, self.global_blocks, self.random_blocks)

    def key_blocks(self, block: int) -> list[int]:
        """Every key block that query block ``block`` attends (sorted): its row of the block map."""
        window = range(max(block - self.window_blocks + 1, 0), block + 1)
        chosen = set(window) | set(range(min(self.global_blocks, block + 1))) | set(self.random_of(block))
        return sorted(chosen)

    def visible(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        qb = torch.div(i, self.block_size, rounding_mode="floor")
        kb = torch.div(j, self.block_size, rounding_mode="floor")
        ok = (qb - kb < self.window_blocks) | ((kb >= 0) & (kb < self.global_blocks))
        if self.random_blocks:
            blocks = torch.unique(qb)
            rows = [self.random_of(int(b)) for b in blocks.tolist()]
            width = max((max(r) + 1 for r in rows if r), default=0)
            if width:
                table = torch.zeros(len(rows), width, dtype=torch.bool)
                for row, chosen in enumerate(rows):
                    table[row, list(chosen)] = True
                table = table.to(i.device)
                row = torch.searchsorted(blocks, qb)
                inside = (kb >= 0) & (kb < width)
                ok = ok | (table[row, kb.clamp(0, width - 1)] & inside)
        return ok

    def kernel_pattern(self, max_position: int) -> dict:
        """The block map itself: ``[n, n]`` with ``n`` blocks up to ``max_position`` (row ``b`` = ``key_blocks(b)``)."""
        return {"block_mask": block_map(self, max_position // self.block_size + 1), "block_size": self.block_size}

    def key_ranges(self, q_lo: int, q_hi: int) -> KeyRanges:
        bs = self.block_size
        first, last = q_lo // bs, q_hi // bs
        ranges = [((first - self.window_blocks + 1) * bs, q_hi + 1), (0, self.global_blocks * bs)]
        for block in range(first, last + 1):
            ranges += [(kb * bs, (kb + 1) * bs) for kb in self.random_of(block)]
        return ranges


@ATTENTIONS.register("block_sparse")
@dataclass(frozen=True)
class BlockSparse(SparseVariant):
    """BigBird block-sparse attention (causal).

    Attributes:
        block_size: positions per block. It and ``query_block`` must divide one another, so that each block of
            queries the block-wise attention scores lies in one attention block or covers whole ones.
        window_blocks: key blocks of the local window, the query's own block included (>= 1).
        global_blocks: leading blocks every query attends.
        random_blocks: random earlier key blocks per query block.
        seed: seed of the random blocks (the pattern is a function of the seed and the block positions).
    """

    name: str = "block_sparse"
    block_size: int = 64
    window_blocks: int = 3
    global_blocks: int = 1
    random_blocks: int = 3
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check(self.block_size >= 1, "attention.block_size", f"must be >= 1, got {self.block_size}")
        check(self.window_blocks >= 1, "attention.window_blocks",
              f"must be >= 1 (a query block always attends its own block), got {self.window_blocks}")
        check(self.global_blocks >= 0, "attention.global_blocks", f"must be >= 0, got {self.global_blocks}")
        check(self.random_blocks >= 0, "attention.random_blocks", f"must be >= 0, got {self.random_blocks}")
        check(self.seed >= 0, "attention.seed", f"must be >= 0, got {self.seed}")
        small, large = sorted((self.block_size, self.query_block))
        check(large % small == 0, "attention.block_size",
              f"{self.block_size} and query_block = {self.query_block} must divide one another (each block of "
              "queries scored at once must lie in one attention block or cover whole ones)")

    def pattern(self, target) -> BlockSparsePattern:
        return BlockSparsePattern(self.block_size, self.window_blocks, self.global_blocks, self.random_blocks,
                                  self.seed, self.query_block)
