"""The resumable, deterministic training data order."""

from itertools import islice

import pytest
import torch

from lce.train import TrainBlocks, blocks_from_stream


def numbered_blocks(n: int) -> torch.Tensor:
    """``[n, 3]`` blocks whose tokens all equal the block's index, so a batch shows which blocks it holds."""
    return torch.arange(n).unsqueeze(1).expand(n, 3).contiguous()


def ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].tolist()


def test_order_is_deterministic_per_seed():
    take = lambda seed: [ids(b) for b in islice(TrainBlocks(numbered_blocks(12), 3, seed).batches(), 8)]
    assert take(5) == take(5)
    assert take(5) != take(6)


@pytest.mark.parametrize("start", [1, 3, 4, 7], ids=lambda k: f"start-{k}")
def test_resume_sees_the_uninterrupted_sequence(start):
    # 10 blocks in micro-batches of 3: 3 batches per epoch (one block dropped), so starts 3 and 7 cross epochs.
    data = TrainBlocks(numbered_blocks(10), 3, seed=1)
    full = [ids(b) for b in islice(data.batches(), 12)]
    assert [ids(b) for b in islice(data.batches(start), 12 - start)] == full[start:]


def test_each_block_once_per_epoch_and_incomplete_batch_dropped():
    data = TrainBlocks(numbered_blocks(10), 3, seed=2)
    batches = [ids(b) for b in islice(data.batches(), 6)]
    for epoch in (batches[:3], batches[3:]):
        seen = [i for batch in epoch for i in batch]
        assert len(seen) == len(set(seen)) == 9
    assert data.batches_per_epoch == 3


def test_processes_interleave_the_global_sequence():
    data = TrainBlocks(numbered_blocks(12), 2, seed=3)
    full = [ids(b) for b in islice(data.batches(4), 8)]
    rank0 = [ids(b) for b in islice(data.batches(4, rank=0, num_processes=2), 4)]
    rank1 = [ids(b) for b in islice(data.batches(4, rank=1, num_processes=2), 4)]
    assert rank0 == full[0::2] and rank1 == full[1::2]


def test_blocks_from_stream_overlap_by_one_token():
    blocks = blocks_from_stream(torch.arange(11), 3)
    assert blocks.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert blocks.dtype == torch.int64
    with pytest.raises(ValueError, match=r"3 tokens.*seq_len \+ 1 = 4"):
        blocks_from_stream(torch.arange(3), 3)
