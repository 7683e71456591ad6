"""MoBA against an independent formulation of the MoBA repository's naive implementation, the selection edge cases,
and the patched model: k covering every block is full attention, prefill + decode equals the full forward."""

import math

import pytest
import torch

import lce
from lce.attention.block_selection import SelectedBlocksAttention, choose_blocks
from lce.attention.moba import MoBA, moba_reference
from lce.errors import ConfigError, LceError
from tests.conftest import (
    assert_checkpointed_training_step,
    assert_close_to_reference,
    assert_decode_matches_full,
    fp64_logits,
    logits,
    make_tiny_llama,
)

IDS = torch.randint(3, 259, (2, 50), generator=torch.Generator().manual_seed(0))


def moba_oracle(q, k, v, block_size, top_k, scale, initial=0):
    """MoBA as the repository's ``moba_attn_varlen_naive`` defines it, one query at a time: the gate of query ``t``
    against each block's mean key, blocks ending at or after ``t``'s block end masked, ``t``'s own block forced, the
    ``min(top_k, blocks)`` largest kept, then softmax over the kept blocks' keys up to ``t``. ``q [T, H, D]``, ``k, v
    [T, H, D]`` (per-head keys: MHA, as the repository's code). ``initial`` leading blocks are forced too (lce's
    ``initial_blocks``; 0 in the repository)."""
    length, heads, _ = q.shape
    blocks = math.ceil(length / block_size)
    means = torch.stack([k[b * block_size:(b + 1) * block_size].mean(0) for b in range(blocks)])  # [N, H, D]
    out = torch.zeros_like(q)
    for h in range(heads):
        for t in range(length):
            own = t // block_size
            gate = []
            for b in range(blocks):
                if b == own or (b < initial and b < own):
                    gate.append(float("inf"))
                elif (b + 1) * block_size > t:  # the block is not entirely before t: a future block
                    gate.append(float("-inf"))
                else:
                    gate.append(float(q[t, h].float() @ means[b, h].float()))
            kept = torch.topk(torch.tensor(gate), min(top_k, blocks)).indices.tolist()
            keys = [j for j in range(t + 1) if j // block_size in kept]
            scores = torch.stack([q[t, h] @ k[j, h] for j in keys]) * scale
            out[t, h] = torch.softmax(scores, 0) @ v[keys, h]
    return out


@pytest.mark.parametrize("length,block_size,top_k,initial", [(40, 8, 3, 0), (37, 8, 2, 0), (30, 8, 9, 0),
                                                        (12, 16, 3, 0), (25, 5, 1, 0), (45, 5, 3, 1)],
                         ids=["multiple", "partial_last_block", "k_exceeds_blocks", "one_block", "block_diagonal",
                              "first_block_forced"])
def test_reference_matches_the_repository_formulation(length, block_size, top_k, initial):
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, 3, length, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ours = moba_reference(q, k, v, block_size, top_k, 8 ** -0.5, initial_blocks=initial)
    oracle = moba_oracle(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), block_size, top_k,
                         8 ** -0.5, initial)
    torch.testing.assert_close(ours[0].transpose(0, 1), oracle, rtol=1e-12, atol=1e-12)  # fp64: rounding only


def test_layer_computation_equals_reference_with_gqa_forward_and_backward():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 300, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 300, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 300, 16, generator=g, requires_grad=True)
    pos = torch.arange(300)[None].expand(2, 300)
    layer = SelectedBlocksAttention(MoBA(block_size=16, top_k=4, initial_blocks=1))
    out, _ = layer(None, q, k, v, None, 0.25, 0.0, q_pos=pos, k_pos=pos)
    ref = moba_reference(q, k, v, 16, 4, 0.25, initial_blocks=1).transpose(1, 2)
    # fp32, same selection (scores formed identically), different summation order: a few ulps of O(1) outputs
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(out.shape, generator=g)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # fp32 gradients summed in another order


def test_first_block_attends_causally_within_itself():
    scores = torch.randn(1, 1, 4, 5)
    chosen = choose_blocks(scores, torch.tensor([[0, 3, 9, 17]]), 8, 3)
    assert sorted(chosen[0, 0, 0].tolist()) == [-1, -1, 0]  # block 0: nothing earlier to choose
    assert sorted(chosen[0, 0, 2].tolist()) == [-1, 0, 1]  # block 1: its own and block 0, one slot empty
    assert chosen[0, 0, 3].tolist()[0] == 2  # its own block ranks first (forced)


def test_k_covering_every_block_is_full_attention():
    model, reference = make_tiny_llama(), make_tiny_llama()
    lce.patch(model, "rope", attention={"name": "moba", "block_size": 8, "top_k": 7})  # 50 tokens: 7 blocks
    # the same attention by another computation: within the stock fp32 forward's own error (conftest)
    assert_close_to_reference(logits(model, IDS), logits(reference, IDS), fp64_logits(reference, IDS))


def test_sparse_selection_changes_the_model_and_unpatch_restores_it():
    model, reference = make_tiny_llama(), make_tiny_llama()
    lce.patch(model, "rope", attention={"name": "moba", "block_size": 8, "top_k": 2})
    assert (logits(model, IDS) - logits(reference, IDS)).abs().max() > 1e-3
    lce.unpatch(model)
    torch.testing.assert_close(logits(model, IDS), logits(reference, IDS))


def test_decode_matches_full_forward():
    model = make_tiny_llama()
    lce.patch(model, "rope", attention={"name": "moba", "block_size": 8, "top_k": 3})
    assert_decode_matches_full(model, IDS[:, :45], prefill=11)


def test_composes_with_a_frequency_method_and_trains():
    model = make_tiny_llama(max_position_embeddings=16)
    lce.patch(model, "yarn", factor=4, attention={"name": "moba", "block_size": 8, "top_k": 2, "layers": [1]})
    assert_checkpointed_training_step(model, IDS[:, :40])


def test_padded_batches_are_refused():
    model = make_tiny_llama()
    lce.patch(model, "rope", attention={"name": "moba", "block_size": 8, "top_k": 2})
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(LceError, match="padded batches"):
        model(IDS[:, :20], attention_mask=mask)


@pytest.mark.parametrize("params,key", [({"block_size": 0}, "attention.block_size"), ({"top_k": 0}, "attention.top_k"),
                                        ({"layers": []}, "attention.layers"),
                                        ({"top_k": 2, "initial_blocks": 2}, "attention.initial_blocks")])
def test_bad_config_gets_a_clear_error(params, key):
    with pytest.raises(ConfigError, match=key):
        MoBA(**params)
