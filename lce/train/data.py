"""Training blocks in a deterministic, resumable order.

A token stream is cut into blocks of ``seq_len + 1`` tokens (``seq_len`` inputs and their ``seq_len`` next-token
targets). Every epoch visits the blocks in a fresh permutation drawn from a generator seeded by ``(seed, epoch)``,
so the micro-batch at any global index can be computed directly: resuming at index ``k`` skips nothing by reading
it and sees exactly what an uninterrupted run would have seen from ``k`` on.

Several processes (accelerate ``num_processes > 1``) share one global sequence of micro-batches: process ``r`` of
``W`` takes global indices ``r, r + W, r + 2W, ...``. One optimizer step therefore consumes ``grad_accum * W``
global micro-batches, and the data position saved in a checkpoint is a global index that stays valid when the
number of processes changes. (accelerate's dataloader sharding with ``skip_first_batches`` would do the same but
would tie the order to a ``DataLoader`` and its sampler state.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from lce.config import check


def seeded(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose stream depends only on ``(seed, epoch)``.

    The pair is hashed rather than summed so that neighbouring seeds never share an epoch's order.
    """
    digest = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def blocks_from_stream(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a token stream into training blocks ``[L] -> [N, seq_len + 1]``, int64.

    Blocks start every ``seq_len`` tokens and overlap by one token, so every token except the first is a target
    exactly once; the tail that does not fill a block is dropped.

    Raises:
        ValueError: if the stream is shorter than one block.
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D stream [L], got shape {tuple(tokens.shape)}")
    if tokens.numel() < seq_len + 1:
        raise ValueError(
            f"a stream of {tokens.numel()} tokens is shorter than one block of seq_len + 1 = {seq_len + 1}"
        )
    n = (tokens.numel() - 1) // seq_len
    return tokens[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len).to(torch.int64).contiguous()


class TrainBlocks:
    """Training blocks served as micro-batches in a seeded per-epoch order.

    Args:
        blocks: ``[N, seq_len + 1]`` int64 token blocks.
        micro_batch_size: blocks per micro-batch; the last incomplete micro-batch of each epoch is dropped.
        seed: seed of the per-epoch permutations.
    """

    def __init__(self, blocks: torch.Tensor, micro_batch_size: int, seed: int = 0):
        if blocks.dim() != 2 or blocks.shape[1] < 2:
            raise ValueError(f"blocks must be [N, seq_len + 1] with seq_len >= 1, got shape {tuple(blocks.shape)}")
        check(micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1, got {micro_batch_size}")
        check(blocks.shape[0] >= micro_batch_size, "train.micro_batch_size",
              f"{micro_batch_size} is more than the {blocks.shape[0]} training blocks")
        self.blocks = blocks
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation) of the last batch served

    def __len__(self) -> int:
        return self.blocks.shape[0]

    @property
    def seq_len(self) -> int:
        return self.blocks.shape[1] - 1

    @property
    def batches_per_epoch(self) -> int:
        return len(self) // self.micro_batch_size

    def order(self, epoch: int) -> torch.Tensor:
        """``[N]`` permutation of block indices visited in ``epoch``."""
        return torch.randperm(len(self), generator=seeded(self.seed, epoch))

    def batch_at(self, index: int) -> torch.Tensor:
        """Global micro-batch ``index`` ``[micro_batch_size, seq_len + 1]``."""
        epoch, position = divmod(index, self.batches_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.order(epoch))
        return self.blocks[self._order[1][position * self.micro_batch_size : (position + 1) * self.micro_batch_size]]

    def indexed_batches(
        self, start_batch: int = 0, *, rank: int = 0, num_processes: int = 1
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Endless ``(global_index, micro_batch)`` pairs from global index ``start_batch`` on (see ``batches``)."""
        index = start_batch + rank
        while True:
            yield index, self.batch_at(index)
            index += num_processes

    def batches(self, start_batch: int = 0, *, rank: int = 0, num_processes: int = 1) -> Iterator[torch.Tensor]:
        """Endless micro-batches ``[micro_batch_size, seq_len + 1]`` from global index ``start_batch`` on.

        Args:
            start_batch: global micro-batch index to start at (micro-batches already consumed by all processes).
            rank: this process's index; it takes global indices ``start_batch + rank + i * num_processes``.
            num_processes: processes sharing the global sequence.
        """
        for _, batch in self.indexed_batches(start_batch, rank=rank, num_processes=num_processes):
            yield batch
