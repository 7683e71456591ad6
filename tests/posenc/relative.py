"""The effective relative distance of every causal pair under a segment method, read off its segments."""

import torch


def relative_positions(segments, length: int) -> torch.Tensor:
    """``[length, length]`` distances ``q_map(i) - k_map(j)`` of the segment selecting each causal pair (the last one
    listed wins, as in the kernels), -1 above the diagonal and for pairs no segment selects."""
    positions = torch.arange(length)[None]
    i, j = positions[:, :, None], positions[:, None, :]
    out = torch.full((length, length), -1, dtype=torch.long)
    for seg in segments:
        distance = seg.q_map(positions)[:, :, None] - seg.k_map(positions)[:, None, :]
        out = torch.where((seg.select(i, j) & (j <= i))[0], distance[0], out)
    return out
