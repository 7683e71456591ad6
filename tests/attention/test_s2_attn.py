"""s2_attn (LongLoRA S²-Attn): the kernel equals an eager reference written from the paper's description and a
transcription of LongLoRA's flash-attention partition (forward and backward), the model in training equals the
unpatched model given the per-head groups as a mask (logits and gradients, activation checkpointing), evaluation is
the unpatched model bit for bit, one group is full attention, and clear errors."""

import pytest
import torch

import lce
from lce.attention.s2_attn import ShiftedGroups
from lce.core.blockwise import blockwise_attention
from lce.errors import ConfigError, LceError
from lce.train.loop import enable_activation_checkpointing
from tests.attention.test_blockwise import random_qkv
from tests.conftest import logits, make_tiny_llama

IDS = torch.randint(3, 259, (2, 32), generator=torch.Generator().manual_seed(3))


def causal(q, k, v, scaling):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)


def s2_paper_reference(q, k, v, group, scaling):
    """LongLoRA §3.2 as written: split the tokens into groups of ``G`` and attend within each group; for half of the
    heads, shift the groups by half a group, ``G // 2`` (their first group is that half); causal in groups."""
    heads, length = q.shape[1], q.shape[2]
    k, v = k.repeat_interleave(heads // k.shape[1], 1), v.repeat_interleave(heads // k.shape[1], 1)
    out = torch.zeros_like(q)
    half = heads // 2
    for first, last, shift in [(0, half, 0), (half, heads, group // 2)]:
        starts = sorted({0, *range(shift or group, length, group)})
        for start, stop in zip(starts, [*starts[1:], length]):
            rows = slice(start, stop)
            out[:, first:last, rows] = causal(q[:, first:last, rows], k[:, first:last, rows], v[:, first:last, rows],
                                              scaling)
    return out.transpose(1, 2)


def longlora_flash_reference(q, k, v, group, scaling):
    """A transcription of LongLoRA ``llama_attn_replace.py: forward_flashattn`` (commit 03ac8a5): heads split in two
    halves stacked as ``2 * bsz`` sequences, cumulative sequence lengths built as its code builds ``cu_q_lens``, and
    causal attention within every varlen segment (what ``flash_attn_varlen_qkvpacked_func(causal=True)`` computes)."""
    bsz, heads, q_len, dim = q.shape
    k, v = k.repeat_interleave(heads // k.shape[1], 1), v.repeat_interleave(heads // k.shape[1], 1)
    # [bsz, nh, q_len, hd] -> [bsz * 2, q_len, nh / 2, hd] (its reshape/permute), unpadded: every sequence full
    packed = [x.transpose(1, 2).reshape(bsz, q_len, 2, heads // 2, dim).permute(0, 2, 1, 3, 4)
              .reshape(bsz * 2 * q_len, heads // 2, dim) for x in (q, k, v)]
    cu_q_lens = torch.arange(0, (bsz * 2 + 1) * q_len, q_len)
    cu_q_len_tmp = torch.arange(0, q_len, group)
    cu_q_len_tmp = torch.stack([cu_q_len_tmp, cu_q_len_tmp + group // 2]).repeat(bsz, 1) + cu_q_lens[:-1].unsqueeze(-1)
    cu_q_lens = torch.cat([cu_q_len_tmp, cu_q_lens[1:].unsqueeze(-1)], dim=-1).view(-1)
    out = torch.zeros_like(packed[0])
    for start, stop in zip(cu_q_lens[:-1].tolist(), cu_q_lens[1:].tolist()):
        if stop > start:
            seg = [x[start:stop].transpose(0, 1)[None] for x in packed]
            out[start:stop] = causal(*seg, scaling)[0].transpose(0, 1)
    return out.reshape(bsz, 2, q_len, heads // 2, dim).transpose(1, 2).reshape(bsz, q_len, heads, dim)


@pytest.mark.parametrize("length,group", [(32, 8), (36, 9), (30, 15)], ids=["G8", "G9_odd", "G15_two_groups"])
def test_kernel_equals_the_paper_and_longlora_forward_and_backward(length, group):
    q, k, v = (t.requires_grad_() for t in random_qkv(batch=2, heads=4, kv_heads=2, tq=length, tk=length))
    pos = torch.arange(length)[None].expand(2, -1)
    out = blockwise_attention(q, k, v, pos, pos, 0.3, visible=ShiftedGroups(group, heads=4), block_size=7)
    paper = s2_paper_reference(q, k, v, group, 0.3)
    torch.testing.assert_close(out, paper)
    torch.testing.assert_close(longlora_flash_reference(q, k, v, group, 0.3), paper)
    upstream = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), upstream), torch.autograd.grad(paper, (q, k, v), upstream)):
        torch.testing.assert_close(g, r)


def per_head_mask(length, group, heads=4):
    i, j = torch.arange(length)[:, None], torch.arange(length)[None]
    shift = group // 2
    same, shifted = i // group == j // group, (i - shift) // group == (j - shift) // group
    return torch.stack([same] * (heads // 2) + [shifted] * (heads - heads // 2))[None] & (j <= i)


def test_training_equals_the_unpatched_model_with_per_head_groups_as_a_mask():
    model = lce.patch(make_tiny_llama(), "rope", attention={"name": "s2_attn", "query_block": 8}).train()
    enable_activation_checkpointing(model)
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    reference = make_tiny_llama().train()
    ref_loss = reference(IDS, labels=IDS, attention_mask=per_head_mask(32, 8).expand(2, -1, -1, -1)).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        assert torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, ref.grad, atol=1e-5, rtol=1e-4)  # fp32 summation order, two layers
    full_loss = make_tiny_llama().train()(IDS, labels=IDS).loss
    assert abs(loss.item() - full_loss.item()) > 1e-4  # training really is sparse


def test_evaluation_is_the_unpatched_model():
    model = lce.patch(make_tiny_llama(), "rope", attention="s2_attn")
    assert torch.equal(logits(model, IDS), logits(make_tiny_llama(), IDS))
    assert torch.equal(logits(model, IDS[:, :23]), logits(make_tiny_llama(), IDS[:, :23]))  # any length


def test_one_group_is_full_attention_in_training():
    model = lce.patch(make_tiny_llama(), "rope", attention={"name": "s2_attn", "group_size_ratio": 1.0}).train()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, make_tiny_llama().train()(IDS).logits)


def test_unshifted_heads_with_one_group_are_full_causal():
    q, k, v = random_qkv(tq=16, tk=16)
    pos = torch.arange(16)[None].expand(2, -1)
    out = blockwise_attention(q, k, v, pos, pos, 0.3, visible=ShiftedGroups(16, heads=4), block_size=5)
    full = causal(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), 0.3).transpose(1, 2)
    torch.testing.assert_close(out[:, :, :2], full[:, :, :2])
    assert (out[:, :, 2:] - full[:, :, 2:]).abs().max() > 1e-3  # shifted heads: two half groups


def test_sequence_length_not_a_multiple_of_the_groups_is_a_clear_error():
    model = lce.patch(make_tiny_llama(), "rope", attention="s2_attn").train()
    with pytest.raises(LceError, match=r"training sequence length 30 must be a multiple of the 4 groups"):
        model(IDS[:, :30])


@pytest.mark.parametrize("ratio,message", [(0.0, r"must be in \(0, 1\]"), (1.5, r"must be in \(0, 1\]"),
                                           (0.3, r"must be 1/n for an integer number of groups")])
def test_bad_ratio_is_a_clear_error(ratio, message):
    with pytest.raises(ConfigError, match=r"attention\.group_size_ratio: " + message):
        lce.patch(make_tiny_llama(), "rope", attention={"name": "s2_attn", "group_size_ratio": ratio})
