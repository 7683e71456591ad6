"""Selected-block attention's Triton kernels (interpreted on CPU) against the materialised reference, forward and
backward (q, k, v): selections shared by a GQA group (``HS = HKV``) and per query head (``HS = HQ``) with 4 query over
2 KV heads, ``-1`` slots, blocks in the query's future, a row with no visible key (output and gradients 0), a partial
last block (``T`` not a multiple of the block), fewer queries than keys at given positions (decode: ``Tq = 1``); the
public op's ``triton`` backend against its ``ref`` backend; the dk/dv kernel's inverted selection against a loop, and
its gradients reproducible bit for bit; sizes the kernels refuse named.

Tolerance, fp32: the kernels' dots are IEEE fp32 (not TF32), so against the reference in fp64 they differ by fp32
rounding of sums of at most ``N * block_size`` (<= 96) terms of O(1) products and the exp2/log2 round trip of the
softmax: ~1e-7 relative, observed <= 1e-6 (gradients included). ``RELATIVE = 2e-6`` (relative max error, ``max|x -
ref| / max|ref|``); a wrong mask, a missed or doubled block, or a wrong head mapping is an error of 1e-2 or more.

Tolerance, bf16: the kernels multiply bf16 operands on tensor cores and round the probabilities and ``dS`` to bf16
before the next product (as FlashAttention does), so they cannot meet fp32's bound. As flash-attention's own tests do,
each output's and gradient's error against the fp64 reference must be at most ``LOW_PRECISION_RATIO`` times the error
of the reference itself run on the same bf16 inputs (its scores in fp32, its results rounded to bf16), plus
``LOW_PRECISION_ATOL`` (a quarter of bf16's spacing at 1: the reference's rounding of an O(1) value can be 0 where the
kernel's is not). Observed ratios 0.6-1.5 (the largest: ``dq``); a mask one key off
gives ratios of 150-1000.

Runtime: every program of the interpreter costs milliseconds per operation, so the shapes are tiny (B <= 2, T <= 100,
D 16 or 32, blocks 16 or 32, N <= 4); the file runs in well under a minute on one core.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (Linux only)")

from lce.errors import LceError
from lce.kernels.backend import interpreting
from lce.kernels.selected_attention import selected_attention, selected_attention_reference
from lce.kernels.selected_attention.triton_selected import invert_selection, selected_attention_triton

#: The CPU tests run the kernels in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA);
#: ``test_real_sizes_on_gpu`` runs them compiled (``-m gpu``).
interpreted = pytest.mark.skipif(not interpreting(), reason="runs the kernels in Triton's interpreter "
                                 "(TRITON_INTERPRET=1, which tests/conftest.py sets where there is no CUDA)")

RELATIVE = 2e-6
LOW_PRECISION_RATIO = 2.0
LOW_PRECISION_ATOL = 2e-3


def selection(batch, heads, tq, tk, block_size, slots, seed):
    """``[B, heads, Tq, slots]`` int32: distinct random blocks per row (any of the ``ceil(Tk / block_size)``, so some
    lie in the query's future), a fifth of the slots ``-1``, and (when ``Tq > 1``) row 0 of every head selecting only
    the last block and empty slots (no visible key when query 0's position lies before the last block)."""
    g = torch.Generator().manual_seed(seed)
    blocks = -(-tk // block_size)
    index = torch.rand(batch, heads, tq, blocks, generator=g).argsort(-1)[..., :slots]
    index = index.masked_fill(torch.rand(index.shape, generator=g) < 0.2, -1)
    if tq > 1:
        index[:, :, 0] = -1
        index[:, :, 0, -1] = blocks - 1
    return index.to(torch.int32)


def make_case(batch, heads, kv_heads, sel_heads, tq, tk, dim, block_size, slots, seed=0, dtype=torch.float32,
              positions=None):
    """``(q, k, v, block_index, q_pos)``; ``positions``: ``"last"`` (the last ``Tq`` of the keys) or ``"random"``
    (sorted distinct positions per batch, the first below the last block)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tq, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, tk, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, tk, dim, generator=g).to(dtype)
    if positions == "random":
        q_pos = torch.stack([torch.randperm(tk, generator=g)[:tq].sort().values for _ in range(batch)])
        q_pos[:, 0] = torch.randint(0, (tk - 1) // block_size * block_size, (batch,), generator=g)
        q_pos = q_pos.sort(-1).values
    else:
        q_pos = torch.arange(tk - tq, tk)[None].expand(batch, tq).contiguous()
    return q, k, v, selection(batch, sel_heads, tq, tk, block_size, slots, seed), q_pos


def outputs_and_gradients(fn, q, k, v, block_index, q_pos, block_size, dtype=None):
    """``[out, dq, dk, dv]`` of ``fn`` on copies of ``q, k, v`` (in ``dtype`` if given) for a fixed output
    gradient."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, block_index, block_size, q.shape[-1] ** -0.5, q_pos)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return [out, *torch.autograd.grad(out, leaves, grad)]


def relative_error(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


CASES = {
    # name: (batch, HQ, HKV, HS, Tq, Tk, D, block, N, positions)
    "shared by the GQA group, T=70, block 16": (1, 4, 2, 2, 70, 70, 16, 16, 3, "last"),
    "per query head, T=45, block 32": (1, 4, 2, 4, 45, 45, 32, 32, 2, "last"),
    "shared, Tq < Tk at random positions": (2, 4, 2, 2, 12, 64, 16, 16, 4, "random"),
    "per query head, decode Tq=1, Tk=100": (2, 4, 2, 4, 1, 100, 16, 32, 3, "last"),
}


@interpreted
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fp32_matches_the_reference(case):
    batch, heads, kv_heads, sel_heads, tq, tk, dim, block, slots, positions = CASES[case]
    q, k, v, index, q_pos = make_case(batch, heads, kv_heads, sel_heads, tq, tk, dim, block, slots,
                                      positions=positions)
    got = outputs_and_gradients(selected_attention_triton, q, k, v, index, q_pos, block)
    want = outputs_and_gradients(selected_attention_reference, q, k, v, index, q_pos, block, torch.float64)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert x.dtype == torch.float32 and x.shape == ref.shape, name
        assert relative_error(x, ref) <= RELATIVE, (name, relative_error(x, ref))
    if positions == "last" and tq > 1:  # query 0 sees no key: output and query gradient exactly 0
        assert got[0][:, :, 0].abs().max() == 0 and got[1][:, :, 0].abs().max() == 0


@interpreted
@pytest.mark.parametrize("case", ["shared by the GQA group, T=70, block 16", "per query head, T=45, block 32"])
def test_bf16_within_the_reference_s_own_error(case):
    batch, heads, kv_heads, sel_heads, tq, tk, dim, block, slots, positions = CASES[case]
    q, k, v, index, q_pos = make_case(batch, heads, kv_heads, sel_heads, tq, tk, dim, block, slots, seed=3,
                                      dtype=torch.bfloat16, positions=positions)
    got = outputs_and_gradients(selected_attention_triton, q, k, v, index, q_pos, block)
    own = outputs_and_gradients(selected_attention_reference, q, k, v, index, q_pos, block)
    want = outputs_and_gradients(selected_attention_reference, q, k, v, index, q_pos, block, torch.float64)
    for name, x, base, ref in zip(("out", "dq", "dk", "dv"), got, own, want):
        assert x.dtype == torch.bfloat16, name
        error, allowed = (x.double() - ref).abs().max().item(), (base.double() - ref).abs().max().item()
        assert error <= LOW_PRECISION_RATIO * allowed + LOW_PRECISION_ATOL, (name, error, allowed)


def test_inverted_selection_lists_each_visible_pair_once_in_order():
    """The dk/dv kernel's lists: per (batch, KV head, block), the rows that selected the block and see a key of it,
    ascending; future blocks, empty slots and blocks past the keys dropped."""
    batch, heads, kv_heads, tq, tk, block = 2, 4, 2, 9, 40, 8
    for sel_heads in (kv_heads, heads):
        index = selection(batch, sel_heads, tq, tk, block, 3, seed=7)
        q_pos = torch.stack([torch.randperm(tk)[:tq] for _ in range(batch)])
        rows, offsets = invert_selection(index, q_pos, block, heads, kv_heads, tk)
        blocks = -(-tk // block)
        want = [[] for _ in range(batch * kv_heads * blocks)]
        for b in range(batch):
            for hs in range(sel_heads):
                kv = hs * (heads // sel_heads) // (heads // kv_heads)
                for t in range(tq):
                    for blk in index[b, hs, t].tolist():
                        if 0 <= blk and blk * block <= q_pos[b, t]:
                            want[(b * kv_heads + kv) * blocks + blk].append((b * sel_heads + hs) * tq + t)
        got = [rows[offsets[i]:offsets[i + 1]].tolist() for i in range(len(want))]
        assert got == [sorted(w) for w in want]
        assert rows.dtype == offsets.dtype == torch.int32


@interpreted
def test_gradients_are_reproducible_bit_for_bit():
    """No atomics: dk and dv are summed in a fixed order (``invert_selection``'s sorted lists)."""
    q, k, v, index, q_pos = make_case(1, 4, 2, 2, 20, 20, 16, 16, 2, seed=9)
    first = outputs_and_gradients(selected_attention_triton, q, k, v, index, q_pos, 16)
    again = outputs_and_gradients(selected_attention_triton, q, k, v, index, q_pos, 16)
    assert all(torch.equal(x, y) for x, y in zip(first, again))


@interpreted
def test_the_public_op_s_triton_backend_equals_its_ref_backend():
    q, k, v, index, q_pos = make_case(1, 4, 2, 2, 40, 40, 16, 16, 2, seed=5)

    def op(backend):
        return lambda *args: selected_attention(*args, backend=backend)

    got = outputs_and_gradients(op("triton"), q, k, v, index, q_pos, 16)
    want = outputs_and_gradients(op("ref"), q, k, v, index, q_pos, 16)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(x, ref, rtol=RELATIVE, atol=RELATIVE, msg=name)


@interpreted
@pytest.mark.parametrize("block_size", [8, 24])
def test_block_sizes_the_kernels_do_not_take_are_refused_in_one_line(block_size):
    q, k, v, index, q_pos = make_case(1, 4, 2, 2, 4, 4, 16, 16, 1)
    with pytest.raises(LceError, match=r"block sizes 16, 32, 64, 128 .*backend 'ref'") as info:
        selected_attention(q, k, v, index, block_size, 0.25, q_pos, backend="triton")
    assert "\n" not in str(info.value)


@interpreted
def test_float64_is_refused():
    q, k, v, index, q_pos = make_case(1, 4, 2, 2, 4, 4, 16, 16, 1, dtype=torch.float64)
    with pytest.raises(LceError, match=r"float16, bfloat16 or float32 .*got torch.float64"):
        selected_attention(q, k, v, index, 16, 0.25, q_pos, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sel_heads, tq", [(2, 2048), (8, 2048), (2, 1)], ids=["shared", "per_head", "decode"])
def test_real_sizes_on_gpu(sel_heads, tq, dtype):
    """Compiled kernels at a real head dim and block (d128, block 64, 8 of 32 blocks, 8 query over 2 KV heads)
    against the fp64 reference, within the tolerance of the bf16/fp16 test above."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q, k, v, index, q_pos = make_case(1, 8, 2, sel_heads, tq, 2048, 128, 64, 8, seed=11, dtype=dtype)
    q, k, v, index, q_pos = (t.cuda() for t in (q, k, v, index, q_pos))
    got = outputs_and_gradients(selected_attention_triton, q, k, v, index, q_pos, 64)
    own = outputs_and_gradients(selected_attention_reference, q, k, v, index, q_pos, 64)
    want = outputs_and_gradients(selected_attention_reference, q, k, v, index, q_pos, 64, torch.float64)
    for name, x, base, ref in zip(("out", "dq", "dk", "dv"), got, own, want):
        error, allowed = (x.double() - ref).abs().max().item(), (base.double() - ref).abs().max().item()
        assert error <= LOW_PRECISION_RATIO * allowed + LOW_PRECISION_ATOL, (name, error, allowed)
