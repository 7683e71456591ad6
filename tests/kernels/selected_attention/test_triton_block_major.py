"""The key-block-major Triton forward of selected-block attention and its backward (``triton_block_major.py``,
interpreted on CPU: the key-block-major dq kernel, ``triton_selected``'s dk/dv kernel with blocks over 128 keys split
into 128-key blocks) against the materialised reference: selections per query head (``HS = HQ``, MoBA's layout, the
one the kernels are for) and shared by a GQA group (``HS = HKV``) with 4 query over 2 KV heads, ``-1`` slots, blocks
in the query's future, a row with no visible key (output 0, gradients 0), a partial last block, blocks of 64 keys
walked in 16- and 32-key sub-tiles, a 256-key block (over ``triton_selected``'s limit; dq walks it whole in
sub-tiles), decode (``Tq = 1`` at given positions), blocks listed twice; the pair lists and row tiles against loops;
equality with ``triton_selected``'s per-token forward and backward kernels; the dq kernel's guard of a row whose
log-sum-exp is ``-inf``; bitwise reproducibility; block sizes refused in one line.

Tolerances as ``test_triton_selected.py`` (its module docstring says why): fp32 relative ``2e-6`` against the
reference in fp64 (the kernels' dots are IEEE fp32; the merge adds one fp32 rescaling per slot, dq one fp32 sum over
the slots), bf16 at most ``LOW_PRECISION_RATIO`` times the reference's own bf16 error plus ``LOW_PRECISION_ATOL``.

Runtime: tiny shapes (B <= 2, T <= 130, D 16 or 32, N <= 4), 16-row tiles and 16-key sub-tiles in the interpreter
(``INTERPRETER_TILES``) so that lists span several tiles; under a minute on one core.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (Linux only)")

from lce.errors import LceError
from lce.kernels.selected_attention import selected_attention_reference
from lce.kernels.selected_attention.reference import drop_repeated_blocks
from lce.kernels.selected_attention.triton_block_major import (
    BACKWARD_BLOCK,
    block_major_backward,
    block_major_dq,
    block_major_forward,
    check_block_major,
    merge_partials,
    merge_partials_fused,
    pair_lists,
    row_tiles,
    selected_attention_block_major,
    split_blocks,
)
from lce.kernels.selected_attention.triton_selected import selected_attention_triton, selected_backward
from tests.kernels.selected_attention.test_triton_selected import (
    LOW_PRECISION_ATOL,
    LOW_PRECISION_RATIO,
    RELATIVE,
    interpreted,
    make_case,
    outputs_and_gradients,
    relative_error,
    selection,
)

CASES = {
    # name: (batch, HQ, HKV, HS, Tq, Tk, D, block, N, positions)
    "per query head, T=45, block 32": (1, 4, 2, 4, 45, 45, 32, 32, 2, "last"),
    "shared by the GQA group, T=70, block 16": (1, 4, 2, 2, 70, 70, 16, 16, 3, "last"),
    "per query head, T=130, block 64 in 16-key sub-tiles": (1, 2, 1, 2, 130, 130, 16, 64, 2, "last"),
    "per query head, Tq=20 < Tk=300, block 256": (1, 2, 1, 2, 20, 300, 16, 256, 2, "random"),
    "shared, Tq < Tk at random positions": (2, 4, 2, 2, 12, 64, 16, 16, 4, "random"),
    "per query head, decode Tq=1, Tk=100": (2, 4, 2, 4, 1, 100, 16, 32, 3, "last"),
}


def case_inputs(case, seed=0, dtype=torch.float32):
    batch, heads, kv_heads, sel_heads, tq, tk, dim, block, slots, positions = CASES[case]
    return make_case(batch, heads, kv_heads, sel_heads, tq, tk, dim, block, slots, seed=seed, dtype=dtype,
                     positions=positions), block


@interpreted
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fp32_matches_the_reference(case):
    (q, k, v, index, q_pos), block = case_inputs(case)
    got = outputs_and_gradients(selected_attention_block_major, q, k, v, index, q_pos, block)
    want = outputs_and_gradients(selected_attention_reference, q, k, v, index, q_pos, block, torch.float64)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert x.dtype == torch.float32 and x.shape == ref.shape, name
        assert torch.isfinite(x).all(), name
        assert relative_error(x, ref) <= RELATIVE, (name, relative_error(x, ref))
    if CASES[case][-1] == "last" and q.shape[2] > 1:  # query 0 sees no key: output and query gradient exactly 0
        assert got[0][:, :, 0].abs().max() == 0 and got[1][:, :, 0].abs().max() == 0


@interpreted
@pytest.mark.parametrize("case", ["per query head, T=45, block 32", "shared by the GQA group, T=70, block 16",
                                  "per query head, Tq=20 < Tk=300, block 256"])
def test_bf16_within_the_reference_s_own_error(case):
    (q, k, v, index, q_pos), block = case_inputs(case, seed=3, dtype=torch.bfloat16)
    got = outputs_and_gradients(selected_attention_block_major, q, k, v, index, q_pos, block)
    own = outputs_and_gradients(selected_attention_reference, q, k, v, index, q_pos, block)
    want = outputs_and_gradients(selected_attention_reference, q, k, v, index, q_pos, block, torch.float64)
    for name, x, base, ref in zip(("out", "dq", "dk", "dv"), got, own, want):
        assert x.dtype == torch.bfloat16, name
        error, allowed = (x.double() - ref).abs().max().item(), (base.double() - ref).abs().max().item()
        assert error <= LOW_PRECISION_RATIO * allowed + LOW_PRECISION_ATOL, (name, error, allowed)


@interpreted
@pytest.mark.parametrize("block_rows, block_keys", [(32, 32), (16, 64)], ids=["32 rows x 32 keys", "16 x 64"])
def test_other_tiles_give_the_same_forward(block_rows, block_keys):
    """64-key blocks walked in 32-key sub-tiles (and whole), 32-row tiles (several pairs of 2 heads per tile when the
    selection is shared): the tiling changes the summation order only."""
    for case in ("per query head, T=130, block 64 in 16-key sub-tiles", "shared by the GQA group, T=70, block 16"):
        (q, k, v, index, q_pos), block = case_inputs(case)
        out, lse = block_major_forward(q, k, v, index, q_pos, block, q.shape[-1] ** -0.5, block_rows, block_keys)
        want = selected_attention_reference(q.double(), k.double(), v.double(), index, block, q.shape[-1] ** -0.5,
                                            q_pos)
        assert relative_error(out, want) <= RELATIVE, (case, relative_error(out, want))
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]


@interpreted
def test_fused_merge_equals_the_torch_merge_and_ignores_unwritten_partials():
    """Rows with some ``-inf`` slots, one with all; the partials of ``-inf`` slots are NaN (uninitialised memory)."""
    g = torch.Generator().manual_seed(2)
    o_part = torch.randn(2, 3, 5, 3, 20, generator=g)  # D = 20: a padded head-dim tile
    lse_part = torch.randn(2, 3, 5, 3, generator=g) * 4
    lse_part[torch.rand(lse_part.shape, generator=g) < 0.3] = float("-inf")
    lse_part[0, 0, 0] = float("-inf")
    want = merge_partials(o_part.masked_fill(lse_part[..., None] == float("-inf"), 0.0), lse_part, torch.float32)
    got = merge_partials_fused(o_part.masked_fill(lse_part[..., None] == float("-inf"), float("nan")), lse_part,
                               torch.float32)
    torch.testing.assert_close(got[0], want[0], rtol=RELATIVE, atol=RELATIVE)
    torch.testing.assert_close(got[1], want[1], rtol=RELATIVE, atol=RELATIVE)
    assert got[0][0, 0, 0].abs().max() == 0 and got[1][0, 0, 0] == float("-inf")


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["per query head, T=130, block 64 in 16-key sub-tiles",
                                  "shared, Tq < Tk at random positions"])
def test_forward_with_the_fused_merge_matches_the_reference(case, dtype):
    (q, k, v, index, q_pos), block = case_inputs(case, seed=5, dtype=dtype)
    scale = q.shape[-1] ** -0.5
    out, _ = block_major_forward(q, k, v, index, q_pos, block, scale, merge="triton")
    want = selected_attention_reference(q.double(), k.double(), v.double(), index, block, scale, q_pos)
    assert out.dtype == dtype
    if dtype == torch.float32:
        assert relative_error(out, want) <= RELATIVE, relative_error(out, want)
    else:
        own = selected_attention_reference(q, k, v, index, block, scale, q_pos)
        error, allowed = (out.double() - want).abs().max().item(), (own.double() - want).abs().max().item()
        assert error <= LOW_PRECISION_RATIO * allowed + LOW_PRECISION_ATOL, (error, allowed)


@interpreted
@pytest.mark.parametrize("case", ["per query head, T=45, block 32", "shared by the GQA group, T=70, block 16",
                                  "per query head, decode Tq=1, Tk=100"])
def test_equals_the_per_token_forward(case):
    """Same output and log-sum-exp as ``triton_selected``'s forward, from which both backwards start."""
    from lce.kernels.selected_attention.triton_selected import selected_forward

    (q, k, v, index, q_pos), block = case_inputs(case, seed=4)
    scale = q.shape[-1] ** -0.5
    got = block_major_forward(q, k, v, index, q_pos, block, scale)
    want = selected_forward(q, k, v, index, q_pos, block, scale)
    torch.testing.assert_close(got[0], want[0], rtol=RELATIVE, atol=RELATIVE)
    torch.testing.assert_close(got[1], want[1], rtol=RELATIVE, atol=RELATIVE)  # -inf rows equal too
    torch.testing.assert_close(selected_attention_block_major(q, k, v, index, block, scale, q_pos),
                               selected_attention_triton(q, k, v, index, block, scale, q_pos), rtol=RELATIVE,
                               atol=RELATIVE)


@interpreted
@pytest.mark.parametrize("case", ["per query head, T=45, block 32", "per query head, Tq=20 < Tk=300, block 256"])
def test_output_and_gradients_are_reproducible_bit_for_bit(case):
    """Each (row, slot) pair has one home in the partial buffers (output and dq), the merge and dq's sum over the
    slots have a fixed order, and the dk/dv kernel sums its lists in order: no atomics."""
    (q, k, v, index, q_pos), block = case_inputs(case, seed=9)
    first = outputs_and_gradients(selected_attention_block_major, q, k, v, index, q_pos, block)
    again = outputs_and_gradients(selected_attention_block_major, q, k, v, index, q_pos, block)
    assert all(torch.equal(x, y) for x, y in zip(first, again))


def backward_inputs(case, seed):
    """``(q, k, v, out, do, lse, index, q_pos, block, scale)`` of ``case`` in fp32: the forward's merged output and
    log-sum-exp and a fixed output gradient."""
    (q, k, v, index, q_pos), block = case_inputs(case, seed=seed)
    index, scale = drop_repeated_blocks(index), q.shape[-1] ** -0.5
    out, lse = block_major_forward(q, k, v, index, q_pos, block, scale)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return q, k, v, out, do, lse, index, q_pos, block, scale


def dq_alone(q, k, v, out, do, lse, index, q_pos, block, scale, block_rows=None, block_keys=None):
    """``dq`` by the key-block-major dq kernel alone (no dk/dv launch: half the interpreter's time)."""
    pairs, offsets = pair_lists(index, q_pos, block, q.shape[1], k.shape[1], k.shape[2])
    delta = (do * out).sum(-1)
    return block_major_dq(q, k, v, do, lse, delta, index, q_pos, pairs, offsets, block, scale, block_rows,
                          block_keys)


def reference_dq(q, k, v, do, index, q_pos, block, scale):
    leaf = q.double().requires_grad_()
    out = selected_attention_reference(leaf, k.double(), v.double(), index, block, scale, q_pos)
    return torch.autograd.grad(out, leaf, do.double())[0]


@interpreted
@pytest.mark.parametrize("case", ["per query head, T=45, block 32", "shared by the GQA group, T=70, block 16",
                                  "per query head, Tq=20 < Tk=300, block 256", "per query head, decode Tq=1, Tk=100"])
def test_gradients_equal_the_per_token_kernels(case):
    """dq by the key-block-major kernel (a 256-key block whole), dk/dv by the same kernel as ``triton_selected``'s
    backward: against ``selected_backward`` (its per-token dq kernel; the 256-key block split into 128-key blocks)
    on the same forward output, within fp32's tolerance (dq's sums run in another order)."""
    q, k, v, out, do, lse, index, q_pos, block, scale = backward_inputs(case, seed=10)
    got = block_major_backward(q, k, v, out, do, lse, index, q_pos, block, scale)
    if block > BACKWARD_BLOCK:
        index, block = split_blocks(index, block, BACKWARD_BLOCK), BACKWARD_BLOCK
    want = selected_backward(q, k, v, out, do, lse, index, q_pos, block, scale)
    for name, x, y in zip(("dq", "dk", "dv"), got, want):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert relative_error(x, y.double()) <= RELATIVE, (name, relative_error(x, y.double()))


@interpreted
@pytest.mark.parametrize("block_rows, block_keys", [(32, 32), (16, 64)], ids=["32 rows x 32 keys", "16 x 64"])
def test_other_tiles_give_the_same_dq(block_rows, block_keys):
    """The 256-key block walked by the dq kernel in 32- and 64-key sub-tiles (no split into 128-key blocks), 32-row
    tiles (several pairs of 2 heads per tile when the selection is shared): against the fp64 reference's dq."""
    for case in ("per query head, Tq=20 < Tk=300, block 256", "shared by the GQA group, T=70, block 16"):
        q, k, v, out, do, lse, index, q_pos, block, scale = backward_inputs(case, seed=11)
        dq = dq_alone(q, k, v, out, do, lse, index, q_pos, block, scale, block_rows, block_keys)
        want = reference_dq(q, k, v, do, index, q_pos, block, scale)
        assert dq.dtype == torch.float32 and relative_error(dq, want) <= RELATIVE, (case, relative_error(dq, want))


@interpreted
def test_a_listed_row_whose_lse_is_minus_inf_gets_dq_zero():
    """``pair_lists`` never lists a pair without a visible key, so the kernel meets ``lse = -inf`` (a row without
    keys) only if a caller's ``lse`` says so: forced here on a listed row, its ``P = exp(S - lse)`` must be 0 (not
    ``exp(-inf - -inf)`` = NaN), so its dq is 0, and every other row's dq is unchanged bit for bit."""
    q, k, v, out, do, lse, index, q_pos, block, scale = backward_inputs("per query head, T=45, block 32", seed=12)
    want = dq_alone(q, k, v, out, do, lse, index, q_pos, block, scale)
    row = divmod(int(want[0].abs().amax(-1).argmax()), q.shape[2])  # (head, token) of a listed row: dq != 0
    assert want[0][row].abs().max() > 0
    lse = lse.clone()
    lse[0][row] = float("-inf")
    dq = dq_alone(q, k, v, out, do, lse, index, q_pos, block, scale)
    assert torch.isfinite(dq).all() and dq[0][row].abs().max() == 0
    dq[0][row] = want[0][row]
    assert torch.equal(dq, want)


@interpreted
@pytest.mark.parametrize("form", ["block_major", "per_token"])
def test_a_block_listed_twice_counts_once(form, monkeypatch):
    """A repeat changes the softmax when the row has other blocks too (blocks A, A, B weigh A twice unless the
    repeat is dropped; a row of only repeats would not tell). Both Triton forwards would weigh it twice: the op drops
    repeats before either runs."""
    from lce.kernels.selected_attention import function, selected_attention

    monkeypatch.setattr(function, "triton_form", lambda *args: form)
    (q, k, v, index, q_pos), block = case_inputs("shared by the GQA group, T=70, block 16", seed=6)
    index[..., 1] = index[..., 0]  # every row lists its first block twice, beside a third slot

    def op(q, k, v, index, block_size, scale, q_pos):
        return selected_attention(q, k, v, index, block_size, scale, q_pos, backend="triton")

    got = outputs_and_gradients(op, q, k, v, index, q_pos, block)
    want = outputs_and_gradients(selected_attention_reference, q, k, v, index, q_pos, block, torch.float64)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert relative_error(x, ref) <= RELATIVE, (name, relative_error(x, ref))


@interpreted
@pytest.mark.parametrize("block_size", [8, 24, 8192])
def test_block_sizes_the_kernel_does_not_take_are_refused_in_one_line(block_size):
    q, k, v, index, q_pos = make_case(1, 4, 2, 2, 4, 4, 16, 16, 1)
    with pytest.raises(LceError, match=rf"block sizes 16, 32, .*, 4096 .*got {block_size}; use backend 'ref'") as info:
        selected_attention_block_major(q, k, v, index, block_size, 0.25, q_pos)
    assert "\n" not in str(info.value)


def test_too_many_pairs_for_int32_are_refused():
    q = torch.empty(1, 2, 2 ** 29, 16, device="meta")
    index = torch.empty(1, 2, 2 ** 29, 4, dtype=torch.int32, device="meta")  # 2^32 (query, slot) pairs
    with pytest.raises(LceError, match=r"pairs in int32.*backend 'ref'"):
        check_block_major(q, q[:, :1], index, 512)


def test_pair_lists_hold_each_visible_pair_once_in_order():
    """Per (batch, KV head, block): the (row, slot) pairs that selected the block and see one of its keys, ascending;
    future blocks, empty slots and blocks past the keys dropped."""
    batch, heads, kv_heads, tq, tk, block, slots = 2, 4, 2, 9, 40, 8, 3
    for sel_heads in (kv_heads, heads):
        index = selection(batch, sel_heads, tq, tk, block, slots, seed=7)
        index[0, 0, 1, 0] = 99  # past the keys
        q_pos = torch.stack([torch.randperm(tk)[:tq] for _ in range(batch)])
        pairs, offsets = pair_lists(index, q_pos, block, heads, kv_heads, tk)
        blocks = -(-tk // block)
        want = [[] for _ in range(batch * kv_heads * blocks)]
        for b in range(batch):
            for hs in range(sel_heads):
                kv = hs * (heads // sel_heads) // (heads // kv_heads)
                for t in range(tq):
                    for n, blk in enumerate(index[b, hs, t].tolist()):
                        if 0 <= blk < blocks and blk * block <= q_pos[b, t]:
                            want[(b * kv_heads + kv) * blocks + blk].append(((b * sel_heads + hs) * tq + t) * slots + n)
        assert [pairs[offsets[i]:offsets[i + 1]].tolist() for i in range(len(want))] == [sorted(w) for w in want]
        assert pairs.dtype == offsets.dtype == torch.int32


def test_row_tiles_cover_every_list_in_order():
    offsets = torch.tensor([0, 0, 5, 6, 6, 20], dtype=torch.int32)
    tiles = row_tiles(offsets, 4)
    want = [(1, 0, 5), (1, 4, 5), (2, 5, 6), (4, 6, 20), (4, 10, 20), (4, 14, 20), (4, 18, 20)]
    assert [tuple(t) for t in tiles.tolist()] == want and tiles.dtype == torch.int32
    assert row_tiles(torch.zeros(4, dtype=torch.int32), 4).shape == (0, 3)


def test_split_blocks_and_dropped_repeats_keep_the_attention():
    """``split_blocks`` (the dk/dv kernel's 128-key blocks) and ``drop_repeated_blocks`` change the selection's form,
    not the keys it selects."""
    q, k, v, index, q_pos = make_case(1, 2, 1, 2, 30, 70, 16, 32, 2, seed=8)
    index[..., 1] = torch.where(torch.arange(30)[None, None] % 2 == 0, index[..., 0], index[..., 1])
    deduped = drop_repeated_blocks(index)
    assert ((deduped == -1) | (deduped == index)).all() and (deduped[..., 1] == -1).sum() >= 15
    scale = 0.25
    want = selected_attention_reference(q, k, v, index, 32, scale, q_pos)
    torch.testing.assert_close(selected_attention_reference(q, k, v, deduped, 32, scale, q_pos), want)
    split = split_blocks(index, 32, 16)
    assert split.shape == (1, 2, 30, 4) and split.dtype == index.dtype
    torch.testing.assert_close(selected_attention_reference(q, k, v, split, 16, scale, q_pos), want)
