"""local_global (Longformer) on a tiny Llama: equal to the unpatched model given the definition as a 4D mask (global
keys seen by every later query, global queries seeing every earlier key), decode == full forward through a global
position, the degenerate identity, training, and clear errors for global positions."""

import pytest
import torch

import lce
from lce.attention.local_global import LocalGlobalPattern
from lce.errors import ConfigError
from lce.train.loop import enable_activation_checkpointing
from tests.attention.test_blockwise import definition_mask
from tests.conftest import assert_close_to_reference, assert_decode_matches_full, fp64_logits, logits, make_tiny_llama

IDS = torch.randint(3, 259, (2, 29), generator=torch.Generator().manual_seed(1))
POS = torch.arange(29)[None].expand(2, -1)


def local_global(window, global_tokens, **extra):
    return {"name": "local_global", "window": window, "global_tokens": global_tokens, "query_block": 8, **extra}


def definition(window, global_tokens):
    g = torch.tensor(global_tokens, dtype=torch.long)
    return lambda i, j: (i - j < window) | (j[..., None] == g).any(-1) | (i[..., None] == g).any(-1)


def test_pattern_semantics():
    pattern = LocalGlobalPattern(window=2, global_tokens=(0, 5))
    i, j = torch.arange(8)[:, None][None], torch.arange(8)[None, :][None]
    seen = (pattern(i, j) & (j <= i))[0]
    assert seen[7].nonzero().flatten().tolist() == [0, 5, 6, 7]  # window of 2 + both global keys
    assert seen[5].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]  # a global query sees every earlier key
    assert seen[3].nonzero().flatten().tolist() == [0, 2, 3]
    assert pattern.key_ranges(6, 7) == [(5, 8), (0, 1), (5, 6)]
    assert pattern.key_ranges(4, 6) == [(0, 7)]  # the block holds global query 5


@pytest.mark.parametrize("window,global_tokens", [(4, [0]), (3, [0, 9, 20]), (1, [2])], ids=str)
def test_equals_the_unpatched_model_with_the_pattern_as_a_mask(window, global_tokens):
    model = lce.patch(make_tiny_llama(), "rope", attention=local_global(window, global_tokens))
    mask = definition_mask(definition(window, global_tokens), POS, POS)
    reference = logits(make_tiny_llama(), IDS, attention_mask=mask)
    torch.testing.assert_close(logits(model, IDS), reference, atol=2e-5, rtol=2e-5)  # fp32 summation order


def test_window_covering_the_sequence_is_full_attention():
    model = lce.patch(make_tiny_llama(), "rope", attention=local_global(29, [0, 3]))
    stock = make_tiny_llama()
    assert_close_to_reference(logits(model, IDS), logits(stock, IDS), fp64_logits(stock, IDS))


def test_decode_matches_full_forward_through_global_positions():
    """Position 20 is global and decoded token by token: it attends every earlier cached key."""
    model = lce.patch(make_tiny_llama(), "rope", attention=local_global(3, [0, 9, 20]))
    assert_decode_matches_full(model, IDS, prefill=11)


def test_training_step_with_activation_checkpointing_matches_the_masked_reference():
    model = lce.patch(make_tiny_llama(), "rope", attention=local_global(4, [0, 9]))
    enable_activation_checkpointing(model)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    reference = make_tiny_llama().train()
    mask = definition_mask(definition(4, [0, 9]), POS, POS)
    reference(IDS, labels=IDS, attention_mask=mask).loss.backward()
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        assert torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, ref.grad, atol=1e-5, rtol=1e-4)  # fp32 summation order, two layers


@pytest.mark.parametrize(
    "global_tokens,message",
    [([64], r"attention\.global_tokens: positions \[64\] are out of range for a model of max_position_embeddings"),
     ([0, 100, 3], r"positions \[100\] are out of range"),
     ([-1], r"attention\.global_tokens: positions must be integers >= 0, got \[-1\]"),
     ([2, 2], r"attention\.global_tokens: has duplicates")],
)
def test_bad_global_tokens_are_clear_errors(global_tokens, message):
    with pytest.raises(ConfigError, match=message):
        lce.patch(make_tiny_llama(), "rope", attention=local_global(4, global_tokens))


def test_bad_window_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"attention\.window: must be >= 1"):
        lce.patch(make_tiny_llama(), "rope", attention=local_global(0, [0]))
