"""Shared inputs of the attention kernel tests: random q/k/v, position layouts and one spec per method."""

from __future__ import annotations

import torch

from lce.attention.block_sparse import BlockSparsePattern
from lce.kernels.attention import segments
from lce.kernels.attention.spec import IDENTITY, AttentionSpec, PairSelect, Rotary, Segment
from lce.posenc.alibi import alibi_slopes
from lce.posenc.frequencies import rope_inv_freq

ROPE = (Segment(IDENTITY, IDENTITY, PairSelect()),)


def random_qkv(batch=2, heads=4, kv_heads=2, tq=37, tk=37, dim=16, dim_v=None, dtype=torch.float32, seed=0,
               requires_grad=False):
    """``q [B, H, Tq, D]``, ``k [B, HKV, Tk, D]``, ``v [B, HKV, Tk, Dv]``."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, tq, dim), (batch, kv_heads, tk, dim), (batch, kv_heads, tk, dim_v or dim)]
    return [torch.randn(*s, generator=g).to(dtype).requires_grad_(requires_grad) for s in shapes]


def positions(batch: int, tq: int, tk: int, layout: str = "contiguous") -> tuple[torch.Tensor, torch.Tensor]:
    """``q_pos [B, Tq]``, ``k_pos [B, Tk]`` (int64); the queries are the last ``Tq`` keys (a KV cache).

    Layouts: ``contiguous`` (0..Tk-1), ``left_pad`` (row b shifted by 3b: negative key positions),
    ``gaps`` (strictly increasing with random gaps, different per row: positions need not be contiguous).
    """
    if layout == "contiguous":
        k_pos = torch.arange(tk).expand(batch, tk)
    elif layout == "left_pad":
        k_pos = torch.stack([torch.arange(tk) - 3 * b for b in range(batch)])
    elif layout == "gaps":
        g = torch.Generator().manual_seed(1)
        k_pos = torch.cumsum(torch.randint(1, 4, (batch, tk), generator=g), dim=1) - 1
    else:
        raise ValueError(layout)
    return k_pos[:, tk - tq:].contiguous(), k_pos.contiguous()


def rotary(dim: int, rotary_dim: int | None = None, **kwargs) -> Rotary:
    return Rotary(rope_inv_freq(rotary_dim or dim, 10000.0).float(), **kwargs)


def block_sparse_mask(length: int, block: int, **kwargs) -> torch.Tensor:
    """BigBird's block map (``lce.attention.block_sparse``) as a ``[nB, nB]`` bool tensor."""
    pattern = BlockSparsePattern(block, **kwargs)
    n = -(-length // block)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for qb in range(n):
        mask[qb, pattern.key_blocks(qb)] = True
    return mask


def spec_for(case: str, heads: int = 4, dim: int = 16, length: int = 64) -> AttentionSpec:
    """One spec per method and modifier, sized for sequences of about ``length`` tokens."""
    scale = dim ** -0.5
    rope = rotary(dim)
    specs = {
        "causal": lambda: AttentionSpec(scale),
        "alibi": lambda: AttentionSpec(scale, alibi_slopes=alibi_slopes(heads)),
        "logn": lambda: AttentionSpec(scale, logn_length=8),
        "window": lambda: AttentionSpec(scale, window=7),
        "window_sinks": lambda: AttentionSpec(scale, window=5, sink_tokens=3),
        "block_sparse": lambda: AttentionSpec(scale, block_mask=block_sparse_mask(length, 8, window_blocks=2,
                                                                                  random_blocks=1),
                                              block_size=8),
        "rope": lambda: AttentionSpec(scale, ROPE, rope),
        "partial_rotary": lambda: AttentionSpec(scale, ROPE, rotary(dim, dim // 2)),
        "interleaved": lambda: AttentionSpec(scale, ROPE, rotary(dim, style="interleaved")),
        "attention_scaling": lambda: AttentionSpec(scale, ROPE, rotary(dim, attention_scaling=1.3)),
        "dca_code": lambda: AttentionSpec(scale, segments.dca_code_segments(12, 4), rope),
        "dca_paper": lambda: AttentionSpec(scale, segments.dca_paper_segments(8, 3, 16), rope),
        "self_extend": lambda: AttentionSpec(scale, segments.self_extend_segments(3, 4), rope),
        "rerope": lambda: AttentionSpec(scale, segments.rerope_segments(6), rope, logn_length=16),
        "sinks": lambda: AttentionSpec(scale, segments.sink_segments(2, 6), rope),
        "dca_window_alibi": lambda: AttentionSpec(scale, segments.dca_code_segments(12, 4),
                                                  rotary(dim, dim // 2, style="interleaved", attention_scaling=0.9),
                                                  alibi_slopes=alibi_slopes(heads), window=20, sink_tokens=2,
                                                  logn_length=10),
    }
    return specs[case]()


CASES = ["causal", "alibi", "logn", "window", "window_sinks", "block_sparse", "rope", "partial_rotary",
         "interleaved", "attention_scaling", "dca_code", "dca_paper", "self_extend", "rerope", "sinks",
         "dca_window_alibi"]
