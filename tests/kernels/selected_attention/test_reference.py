"""The selected-block attention op's PyTorch forms: the key-block-major (chunked) and masked forms against the
materialised reference, forward and backward, in fp64 and (masked) bf16; plain causal attention when every block is
selected; which form the op runs."""

import pytest
import torch

from lce.core.blockwise import masked_attention_eager
from lce.errors import LceError
from lce.kernels.selected_attention import (
    selected_attention,
    selected_attention_chunked,
    selected_attention_masked,
    selected_attention_reference,
    selection_mask,
)
from lce.kernels.selected_attention.function import pytorch_form


def random_selection(batch, heads, tq, blocks, slots, generator, empty=0.2):
    """Distinct block numbers per row (``-1`` with probability ``empty``)."""
    rows = [torch.randperm(blocks, generator=generator)[:slots] for _ in range(batch * heads * tq)]
    index = torch.stack(rows).view(batch, heads, tq, slots)
    drop = torch.rand(index.shape, generator=generator) < empty
    return index.masked_fill(drop, -1)


def inputs(batch=2, hq=4, hkv=2, tq=45, tk=45, dim=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, tq, dim, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, hkv, tk, dim, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, hkv, tk, dim, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v, g


FORMS = {"block_major": selected_attention_chunked, "masked": selected_attention_masked}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("per_head", [True, False], ids=["per_query_head", "per_gqa_group"])
@pytest.mark.parametrize("tq,tk", [(45, 45), (7, 45), (1, 45)], ids=["prefill", "suffix", "decode"])
def test_forms_equal_reference_forward_and_backward(form, per_head, tq, tk):
    # fp64 on both sides: the forms differ only in summation order, so agreement is to ~1e-15 (tolerance 1e-12);
    # chunks of 4 queries: the masked form's chunks see fewer keys than the whole, blocks past them included
    q, k, v, g = inputs(tq=tq, tk=tk)
    block_size = 8
    index = random_selection(2, 4 if per_head else 2, tq, -(-tk // block_size), 3, g)
    ref = selected_attention_reference(q, k, v, index, block_size, 0.3)
    fast = FORMS[form](q, k, v, index, block_size, 0.3, chunk=4)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    weight = torch.randn(ref.shape, generator=g, dtype=ref.dtype)
    grads_ref = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    grads_fast = torch.autograd.grad((fast * weight).sum(), (q, k, v))
    for fast_grad, ref_grad in zip(grads_fast, grads_ref):
        torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_every_block_selected_is_causal_attention():
    q, k, v, _ = inputs(tq=37, tk=37)
    blocks = -(-37 // 8)
    index = torch.arange(blocks).expand(2, 2, 37, blocks).contiguous()
    pos = torch.arange(37)[None].expand(2, 37)
    full = masked_attention_eager(q, k, v, pos, pos, 0.3).transpose(1, 2)
    torch.testing.assert_close(selected_attention_reference(q, k, v, index, 8, 0.3), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(selected_attention(q, k, v, index, 8, 0.3, backend="ref"), full, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("form", list(FORMS))
def test_rows_without_a_visible_key_are_zero_and_gradients_finite(form):
    q, k, v, _ = inputs(tq=20, tk=20)
    index = torch.full((2, 2, 20, 2), -1)
    index[..., 0] = 1  # block 1 (keys 8..15): queries 0..7 see none of it
    out = FORMS[form](q, k, v, index, 8, 0.3, chunk=4)
    assert out[:, :, :8].abs().max() == 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert q.grad[:, :, :8].abs().max() == 0


def test_masked_form_in_bf16_is_within_the_reference_s_own_error():
    """The masked form runs SDPA in bf16 (scores and softmax in fp32, probabilities rounded to bf16 before the value
    product), the reference in fp32: against the fp64 reference, each output's and gradient's error must be at most
    twice that of the reference run on the same bf16 inputs, plus a quarter of bf16's spacing at 1 (the reference's
    rounding of an O(1) value can be 0 where the form's is not): FlashAttention's tests' rule. Observed ratios
    0.4-1.7; a mask one key off gives 100 or more."""
    q, k, v, g = inputs(tq=45, tk=45, dtype=torch.float32, seed=3)
    q, k, v = (t.detach().to(torch.bfloat16) for t in (q, k, v))
    index = random_selection(2, 4, 45, 6, 3, g)
    grad = torch.randn(2, 4, 45, 8, generator=g)

    def run(fn, dtype=None, **kw):
        leaves = [t.to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, index, 8, 0.3, **kw)
        return [out, *torch.autograd.grad(out, leaves, grad.to(out.dtype))]

    got = run(selected_attention_masked, chunk=16)
    own = run(selected_attention_reference)
    want = run(selected_attention_reference, torch.float64)
    for name, x, base, ref in zip(("out", "dq", "dk", "dv"), got, own, want):
        assert x.dtype == torch.bfloat16, name
        error, allowed = (x.double() - ref).abs().max().item(), (base.double() - ref).abs().max().item()
        assert error <= 2.0 * allowed + 2e-3, (name, error, allowed)


@pytest.mark.parametrize("block_size,slots,sel_heads,tq,tk,form", [
    # the six measured points function.py's costs come from (9 query heads): the faster form at each
    (16, 64, 9, 4096, 4096, "masked"),  # Quest's 16-key pages: 0.58 s vs 2.80 s
    (16, 64, 9, 16384, 16384, "masked"),  # 15.0 s vs 19.1 s
    (64, 16, 3, 4096, 4096, "block_major"),  # NSA: 0.63 s vs 0.85 s
    (64, 16, 3, 16384, 16384, "block_major"),  # 5.2 s vs 11.5 s
    (512, 3, 9, 4096, 4096, "block_major"),  # MoBA: 0.76 s vs 0.99 s
    (512, 3, 9, 16384, 16384, "block_major"),  # 3.6 s vs 10.5 s
    (512, 3, 9, 1, 16384, "masked"),  # decoding: three steps cost more than scoring 16k keys in SDPA
])
def test_the_op_runs_the_faster_form_for_the_selection(block_size, slots, sel_heads, tq, tk, form):
    assert pytorch_form(torch.zeros(1, sel_heads, tq, slots, dtype=torch.long), block_size, tk, 9) == form


def test_partial_last_block_and_q_pos():
    # 21 keys in blocks of 8: block 2 holds keys 16..20 only; queries placed at explicit positions
    q, k, v, _ = inputs(batch=1, tq=3, tk=21)
    pos = torch.tensor([[3, 17, 20]])
    index = torch.tensor([2, 0, -1]).expand(1, 2, 3, 3).contiguous()
    ref = selected_attention_reference(q, k, v, index, 8, 0.5, pos)
    fast = selected_attention_chunked(q, k, v, index, 8, 0.5, pos)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    # query at position 17 sees keys 0..7 and 16..17: compare with an explicit softmax
    keys = torch.tensor([*range(8), 16, 17])
    kk = k[0, 0, keys]
    p = torch.softmax(q[0, 0, 1] @ kk.T * 0.5, -1)
    torch.testing.assert_close(ref[0, 0, 1], p @ v[0, 0, keys], rtol=1e-12, atol=1e-12)


def test_selection_mask():
    index = torch.tensor([[[[2, -1], [0, 2]]]])
    mask = selection_mask(index, 10, 4)
    assert mask[0, 0, 0].tolist() == [False] * 8 + [True, True]
    assert mask[0, 0, 1].tolist() == [True] * 4 + [False] * 4 + [True, True]
    assert selection_mask(torch.tensor([[[[5, 0]]]]), 10, 4)[0, 0, 0].tolist() == [True] * 4 + [False] * 6  # no block 5


@pytest.mark.parametrize("change,message", [
    (lambda a: {**a, "k": a["k"][:, :, :, :4], "v": a["v"][:, :, :, :4]}, "q must be"),
    (lambda a: {**a, "block_index": a["block_index"][:, :1]}, "block_index must be"),
    (lambda a: {**a, "block_index": a["block_index"].float()}, "int32 or int64"),
    (lambda a: {**a, "block_size": 0}, "block_size"),
    (lambda a: {**a, "q_pos": torch.zeros(1, 3)}, "q_pos must be"),
])
def test_bad_inputs_get_one_line_errors(change, message):
    q, k, v, _ = inputs(hq=4, hkv=2, tq=5, tk=5)
    args = {"q": q, "k": k, "v": v, "block_index": torch.zeros(2, 4, 5, 1, dtype=torch.long), "block_size": 4,
            "scale": 1.0}
    with pytest.raises(LceError, match=message):
        selected_attention(**change(args))


def test_auto_runs_the_pytorch_form_for_sizes_the_kernels_do_not_take(monkeypatch):
    """On CUDA ``auto`` resolves to Triton; a block size its kernels refuse (MoBA's 512) must fall back, not fail,
    while an explicit ``triton`` keeps the one-line error."""
    pytest.importorskip("triton")
    from lce.kernels.selected_attention import function

    monkeypatch.setattr(function, "resolve_backend", lambda backend, *tensors: "triton")
    q, k, v, g = inputs(tq=30, tk=30)
    index = random_selection(2, 2, 30, 2, 2, g, empty=0.0)
    expected = selected_attention_reference(q, k, v, index, 24, 0.3)
    torch.testing.assert_close(selected_attention(q, k, v, index, 24, 0.3), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(LceError, match="block sizes"):
        selected_attention(q, k, v, index, 24, 0.3, backend="triton")


@pytest.mark.parametrize("form", list(FORMS))
def test_a_block_listed_twice_counts_once(form, monkeypatch):
    """The reference's contract; the key-block-major form alone would weigh a repeated block twice, so the op drops
    repeats before any form runs."""
    from lce.kernels.selected_attention import function

    monkeypatch.setattr(function, "pytorch_form", lambda *args: form)
    q, k, v, g = inputs(tq=30, tk=30)
    index = random_selection(2, 4, 30, 4, 3, g, empty=0.0)
    repeated = torch.cat([index, index[..., :2]], -1)  # every row lists its first two blocks twice
    expected = selected_attention_reference(q, k, v, index, 8, 0.3)
    torch.testing.assert_close(selected_attention_reference(q, k, v, repeated, 8, 0.3), expected, rtol=0, atol=0)
    torch.testing.assert_close(selected_attention(q, k, v, repeated, 8, 0.3, backend="ref"), expected, rtol=1e-12,
                               atol=1e-12)


def test_the_triton_forward_is_key_block_major_for_a_selection_per_query_head_and_for_large_blocks():
    pytest.importorskip("triton")
    from lce.kernels.selected_attention.function import triton_form

    def form(sel_heads, tq, block_size):
        return triton_form(torch.zeros(1, sel_heads, tq, 4, dtype=torch.long), block_size, 8)

    assert form(8, 4096, 64) == "block_major"  # MoBA / Quest prefill: tiles of queries that chose a block
    assert form(8, 1, 64) == "per_token"  # decoding: one query per block list
    assert form(2, 4096, 64) == "per_token"  # NSA: the GQA group fills the per-token tile
    assert form(2, 1, 512) == form(8, 1, 512) == "block_major"  # over 128 keys: only the key-block-major forward
