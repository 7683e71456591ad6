"""block_sparse (BigBird) on a tiny Llama: the seeded random blocks (count, eligibility, reproducibility, a function
of positions), equality with the unpatched model given the block map as a 4D mask, every block == full causal,
decode == full forward, training gradients, and clear errors."""

import pytest
import torch

import lce
from lce.attention.block_sparse import BlockSparsePattern
from lce.errors import ConfigError
from lce.train.loop import enable_activation_checkpointing
from tests.attention.test_blockwise import block_sparse_definition, definition_mask
from tests.conftest import assert_close_to_reference, assert_decode_matches_full, fp64_logits, logits, make_tiny_llama

IDS = torch.randint(3, 259, (2, 29), generator=torch.Generator().manual_seed(2))
POS = torch.arange(29)[None].expand(2, -1)


def block_sparse(**params):
    return {"name": "block_sparse", "block_size": 4, "query_block": 8, "window_blocks": 2, "global_blocks": 1,
            "random_blocks": 1, **params}


def block_map_mask(pattern: BlockSparsePattern):
    """The 4D mask from each query block's key-block list (python sets, not the tensor predicate under test)."""
    return definition_mask(block_sparse_definition(pattern), POS, POS)


def test_random_blocks_are_seeded_counted_and_eligible():
    pattern = BlockSparsePattern(block_size=16, window_blocks=3, global_blocks=2, random_blocks=3, seed=7)
    for block in range(40):
        chosen = pattern.random_of(block)
        eligible = range(2, block - 3 + 1)
        assert set(chosen) <= set(eligible)
        assert len(chosen) == min(3, max(len(eligible), 0))
    assert pattern.key_blocks(30) == sorted({0, 1, 28, 29, 30, *pattern.random_of(30)})
    again = BlockSparsePattern(block_size=16, window_blocks=3, global_blocks=2, random_blocks=3, seed=7)
    other = BlockSparsePattern(block_size=16, window_blocks=3, global_blocks=2, random_blocks=3, seed=8)
    assert [again.random_of(b) for b in range(40)] == [pattern.random_of(b) for b in range(40)]
    assert [other.random_of(b) for b in range(40)] != [pattern.random_of(b) for b in range(40)]


def test_the_pattern_is_a_function_of_positions_not_of_the_call():
    """One query scored alone (decoding) sees exactly its row of the pattern scored for all queries at once."""
    pattern = BlockSparsePattern(block_size=4, window_blocks=1, global_blocks=1, random_blocks=2, seed=3)
    i, j = torch.arange(64)[None, :, None], torch.arange(64)[None, None, :]
    everything = pattern(i, j)
    for position in [5, 17, 40, 63]:
        assert torch.equal(pattern(torch.tensor([[[position]]]), j)[0, 0], everything[0, position])
    assert torch.equal(pattern(i[:, 32:48], j), everything[:, 32:48])


def test_equals_the_unpatched_model_with_the_block_map_as_a_mask():
    model = lce.patch(make_tiny_llama(), "rope", attention=block_sparse(seed=4))
    pattern = model.model.layers[0].self_attn.lce_plan.restriction
    assert pattern == BlockSparsePattern(4, 2, 1, 1, 4, query_block=8)
    reference = logits(make_tiny_llama(), IDS, attention_mask=block_map_mask(pattern))
    torch.testing.assert_close(logits(model, IDS), reference, atol=2e-5, rtol=2e-5)  # fp32 summation order
    assert (logits(model, IDS) - logits(make_tiny_llama(), IDS)).abs().max() > 1e-2


@pytest.mark.parametrize("params", [{"random_blocks": 8, "window_blocks": 1, "global_blocks": 0},
                                    {"window_blocks": 8, "random_blocks": 0, "global_blocks": 0},
                                    {"global_blocks": 8, "window_blocks": 1, "random_blocks": 0}],
                         ids=["all_random", "all_window", "all_global"])
def test_every_block_selected_is_full_causal_attention(params):
    model = lce.patch(make_tiny_llama(), "rope", attention=block_sparse(**params))  # 29 tokens: 8 blocks
    stock = make_tiny_llama()
    assert_close_to_reference(logits(model, IDS), logits(stock, IDS), fp64_logits(stock, IDS))


def test_decode_matches_full_forward():
    model = lce.patch(make_tiny_llama(), "rope", attention=block_sparse(random_blocks=2, seed=1))
    assert_decode_matches_full(model, IDS, prefill=11)


def test_training_step_with_activation_checkpointing_matches_the_masked_reference():
    model = lce.patch(make_tiny_llama(), "rope", attention=block_sparse(seed=2))
    enable_activation_checkpointing(model)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    reference = make_tiny_llama().train()
    mask = block_map_mask(model.model.layers[0].self_attn.lce_plan.restriction)
    reference(IDS, labels=IDS, attention_mask=mask).loss.backward()
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        assert torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, ref.grad, atol=1e-5, rtol=1e-4)  # fp32 summation order, two layers


@pytest.mark.parametrize(
    "params,message",
    [({"block_size": 0}, r"attention\.block_size: must be >= 1"),
     ({"block_size": 48, "query_block": 128}, r"attention\.block_size: 48 and query_block = 128 must divide one"),
     ({"block_size": 3}, r"attention\.block_size: 3 and query_block = 8 must divide one another"),
     ({"window_blocks": 0}, r"attention\.window_blocks: must be >= 1"),
     ({"global_blocks": -1}, r"attention\.global_blocks: must be >= 0"),
     ({"random_blocks": -2}, r"attention\.random_blocks: must be >= 0"),
     ({"seed": -1}, r"attention\.seed: must be >= 0"),
     ({"layers": [0, 7]}, r"attention\.layers: layer indices \[7\] are out of range")],
)
def test_bad_parameters_are_clear_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        lce.patch(make_tiny_llama(), "rope", attention=block_sparse(**params))
