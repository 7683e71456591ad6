"""Quest-style top-k blocks: the bound is an upper bound, the fast scores equal Quest's element-wise form, the layer
equals the reference, k covering every block is full attention, prefill + decode equals the full forward."""

import pytest
import torch

import lce
from lce.attention.block_selection import SelectedBlocksAttention, block_bounds
from lce.attention.topk_blocks import TopKBlocks, quest_scores, topk_blocks_reference
from lce.errors import ConfigError
from tests.conftest import (
    assert_close_to_reference,
    assert_decode_matches_full,
    fp64_logits,
    logits,
    make_tiny_llama,
)

IDS = torch.randint(3, 259, (2, 50), generator=torch.Generator().manual_seed(0))


def test_bound_is_quests_elementwise_form_and_bounds_every_score():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 37, 8, generator=g, dtype=torch.float64)
    high, low = block_bounds(k, 8)
    bound = quest_scores(q, (high, low))
    for b in range(4):  # complete blocks (block 4 is partial: never scored, always the query's own)
        per_dim = torch.maximum(q * high[:, :, b, None], q * low[:, :, b, None]).sum(-1)  # Quest's Σ_d max(...)
        torch.testing.assert_close(bound[..., b].double(), per_dim, rtol=1e-6, atol=1e-6)  # fp32 scores
        exact = (q @ k[:, :, b * 8:(b + 1) * 8].transpose(-1, -2)).amax(-1)
        assert bool((bound[..., b] >= exact - 1e-5).all())


def test_layer_computation_equals_reference():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 200, 16, generator=g), *(torch.randn(1, 2, 200, 16, generator=g) for _ in range(2))
    pos = torch.arange(200)[None]
    out, _ = SelectedBlocksAttention(TopKBlocks(block_size=16, top_k=3))(None, q, k, v, None, 0.25, 0.0, q_pos=pos,
                                                                           k_pos=pos)
    torch.testing.assert_close(out, topk_blocks_reference(q, k, v, 16, 3, 0.25).transpose(1, 2), rtol=1e-5,
                               atol=1e-5)  # fp32, same selection, another summation order


def test_k_covering_every_block_is_full_attention():
    model, reference = make_tiny_llama(), make_tiny_llama()
    lce.patch(model, "rope", attention={"name": "topk_blocks", "block_size": 16, "top_k": 4})
    # the same attention by another computation: within the stock fp32 forward's own error (conftest)
    assert_close_to_reference(logits(model, IDS), logits(reference, IDS), fp64_logits(reference, IDS))


def test_decode_matches_full_forward_with_dense_first_layer():
    model = make_tiny_llama()
    lce.patch(model, "rope",
              attention={"name": "topk_blocks", "block_size": 4, "top_k": 3, "layers": "all_but_first:1"})
    assert_decode_matches_full(model, IDS[:, :40], prefill=9)


def test_bad_config_gets_a_clear_error():
    with pytest.raises(ConfigError, match="attention.top_k"):
        TopKBlocks(top_k=-1)
