"""Triton kernels against the chunked reference, forward and backward (dH, dW, dbias), in Triton's interpreter on
CPU (tests/conftest.py) or compiled on CUDA.

Tiny shapes with 16-wide tiles: N, V and C are not multiples of a tile, so every masked edge is exercised, and rows
with ignore_index appear at block starts and inside blocks.
"""

from dataclasses import replace

import pytest
import torch

from lce.kernels.cross_entropy import IGNORE_INDEX, LogitHead, linear_cross_entropy_ref
from lce.kernels.cross_entropy.function import linear_cross_entropy_triton
from tests.kernels.cross_entropy.cases import LargestTensor, make_case, nll_and_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TILES = (16, 16, 16)


def triton_fn(tiles=TILES):
    return lambda h, head, t: linear_cross_entropy_triton(h.to(DEVICE), head_to(head), t.to(DEVICE), tiles)


def head_to(head):
    """The head on ``DEVICE``, still differentiable with respect to the original leaves."""
    bias = None if head.bias is None else head.bias.to(DEVICE)
    return replace(head, weight=head.weight.to(DEVICE), bias=bias)


def ref_fn(h, head, t):
    return linear_cross_entropy_ref(h, head, t, chunk_size=8)


CASES = {
    "plain": {"bias": False},
    "bias": {"bias": True},
    "multiplier": {"bias": False, "multiplier": 0.7},
    "softcap": {"bias": False, "softcap": 1.5},
    "bias_multiplier_softcap": {"bias": True, "multiplier": 0.25, "softcap": 2.0},
    "fewer_rows_than_a_block": {"n": 5, "ignored": (2,), "softcap": 1.5},
    "all_rows_ignored": {"n": 18, "ignored": tuple(range(18))},
}


@pytest.mark.parametrize("params", CASES.values(), ids=CASES.keys())
def test_triton_equals_reference_fp32(params):
    case = make_case(**params)
    got = nll_and_grads(triton_fn(), case)
    want = nll_and_grads(ref_fn, case)
    # Same fp32 math, another summation order (tiles over C and V, an online log-sum-exp) and an exp-based tanh
    # (absolute error ~1e-7 * softcap): measured differences ~1e-6 on values of order 1-10; 1e-5 leaves 10x margin.
    for name in want:
        torch.testing.assert_close(got[name].cpu(), want[name], rtol=1e-5, atol=1e-5, msg=name)
    ignored = case.targets == IGNORE_INDEX
    assert torch.all(got["nll"].cpu()[ignored] == 0) and torch.all(got["dh"].cpu()[ignored] == 0)


def test_huge_logits_stay_finite():
    """Logits of order 1000 (multiplier 100): exp overflows fp32 beyond 88, so this fails unless the log-sum-exp is
    taken relative to the running max and the padding rows of the last block (lse and grad 0) are masked out of dS."""
    case = make_case(multiplier=100.0)
    got = nll_and_grads(triton_fn(), case)
    want = nll_and_grads(ref_fn, case)
    for name in want:
        assert torch.isfinite(got[name]).all(), name
        # An fp32 ulp of a logit of 1000 is 6e-5; summation order moves logits by a few ulps, which p and the x100
        # chain factor carry into gradients of order 100-500: measured 6.5e-3 absolute at most (2.6e-5 of the max).
        torch.testing.assert_close(got[name].cpu(), want[name], rtol=1e-4, atol=2e-2, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_error_is_at_most_twice_pytorchs(dtype):
    """Both paths in ``dtype`` against the fp32 reference on the same (rounded) inputs: the kernel's error must be at
    most twice plain PyTorch's in that dtype (the rule of flash-attention's tests). The kernel never rounds logits
    to ``dtype`` (PyTorch does), and rounds dS to ``dtype`` before the gradient matmuls as PyTorch's autograd does."""
    case = make_case(multiplier=0.7, softcap=2.0)
    for name in ("hidden", "weight", "bias"):
        setattr(case, name, getattr(case, name).to(dtype).float())
    exact = nll_and_grads(ref_fn, case)
    kernel = nll_and_grads(triton_fn(), case, dtype)
    torch_ = nll_and_grads(ref_fn, case, dtype)
    for name in exact:
        kernel_error = (kernel[name].cpu() - exact[name]).abs().max()
        torch_error = (torch_[name] - exact[name]).abs().max()
        # + 1e-5: fp32-level noise where PyTorch's error happens to be tiny.
        assert kernel_error <= 2 * torch_error + 1e-5, (name, kernel_error, torch_error)


def test_gradient_only_for_inputs_that_require_it():
    case = make_case(softcap=1.5)
    hidden, head = case.head()
    head.weight.requires_grad_(False)
    head.bias.requires_grad_(False)
    nll = linear_cross_entropy_triton(hidden, head, case.targets, TILES)
    (nll * case.upstream).sum().backward()
    want = nll_and_grads(ref_fn, case)
    assert head.weight.grad is None and head.bias.grad is None
    # As in test_triton_equals_reference_fp32.
    torch.testing.assert_close(hidden.grad, want["dh"], rtol=1e-5, atol=1e-5)


def test_results_are_deterministic():
    case = make_case(softcap=1.5)
    first, second = nll_and_grads(triton_fn(), case), nll_and_grads(triton_fn(), case)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_triton_never_materialises_logits():
    """Forward and backward allocate nothing larger than the inputs and their gradients ([N, C], [V, C]): logits
    live only in tiles inside the kernels."""
    n, c, v = 40, 16, 300
    case = make_case(n=n, c=c, v=v, softcap=1.5)
    with LargestTensor() as largest:
        nll_and_grads(triton_fn((16, 64, 16)), case)
    assert largest.nbytes == 4 * v * c < 4 * n * v  # fp32: the weight's gradient is the largest


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["no_softcap", "softcap30"])
def test_llama3_sized_vocabulary_on_gpu(softcap):
    """bf16 at a Llama-3 vocabulary (128256) and hidden size 2048: within twice PyTorch's bf16 error of the fp32
    reference, and no N x V logits in the kernel's peak memory."""
    n, c, v = 4096, 2048, 128256
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, c, device="cuda", generator=g)
    weight = torch.randn(v, c, device="cuda", generator=g) * 0.02
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[::7] = IGNORE_INDEX

    def run(fn, dtype):
        h, w = hidden.to(dtype).clone().requires_grad_(), weight.to(dtype).clone().requires_grad_()
        nll = fn(h, LogitHead(w, None, 1.0, softcap), targets)
        nll.sum().backward()
        return nll, h.grad, w.grad

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    kernel = run(lambda h, head, t: linear_cross_entropy_triton(h, head, t), torch.bfloat16)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # bf16 copies of the inputs, their bf16 gradients and the fp32 gradient accumulators; the slack (a quarter of one
    # bf16 N x V logit matrix, 263 MB) is far below what materialised logits would add.
    assert peak < (n + v) * c * (2 + 2 + 4) + n * v * 2 // 4, peak
    exact = run(lambda h, head, t: linear_cross_entropy_ref(h, head, t, 1024), torch.float32)
    torch_ = run(lambda h, head, t: linear_cross_entropy_ref(h, head, t, 1024), torch.bfloat16)
    for name, k, e, p in zip(("nll", "dh", "dw"), kernel, exact, torch_):
        # As in test_half_precision_error_is_at_most_twice_pytorchs.
        assert (k.float() - e).abs().max() <= 2 * (p.float() - e).abs().max() + 1e-5, name
