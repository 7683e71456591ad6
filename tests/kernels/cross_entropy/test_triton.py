"""The Triton path (chunked logits, gradients taken in the forward pass) against the chunked reference, forward and
backward (dH, dW, dbias), in Triton's interpreter on CPU (tests/conftest.py) or compiled on CUDA.

Tiny shapes with 8-row chunks and 16-column vocabulary slices: N (37) is not a multiple of the chunk and V (75) not a
multiple of the slice, so the last chunk and every row's last slice are partial; rows with ignore_index appear at
chunk starts and inside chunks, and one case ignores a whole chunk. Every case runs with a per-token upstream
gradient (the backward recomputes dW and db) and with one upstream value on every scored row (the gradients kept
from the forward pass are scaled).
"""

import inspect
from dataclasses import replace

import pytest
import torch

from lce.kernels.cross_entropy import IGNORE_INDEX, LogitHead, linear_cross_entropy_ref
from lce.kernels.cross_entropy import triton_linear_cross_entropy as ce
from lce.kernels.cross_entropy.function import linear_cross_entropy_triton
from tests.kernels.cross_entropy.cases import LargestTensor, make_case, nll_and_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CHUNK, BLOCK_V = 8, 16


def triton_fn(chunk=CHUNK, block_v=BLOCK_V):
    return lambda h, head, t: linear_cross_entropy_triton(h.to(DEVICE), head_to(head), t.to(DEVICE), chunk, block_v)


def head_to(head):
    """The head on ``DEVICE``, still differentiable with respect to the original leaves."""
    bias = None if head.bias is None else head.bias.to(DEVICE)
    return replace(head, weight=head.weight.to(DEVICE), bias=bias)


def ref_fn(h, head, t):
    return linear_cross_entropy_ref(h, head, t, chunk_size=CHUNK)


def with_upstream(case, kind):
    """``per_token``: the case's random upstream; ``uniform``: 0.3 on every scored row and anything (here 5.0) on
    ignored ones, as ``nll.sum() / scored`` gives up to the value on ignored rows, which multiplies zeros."""
    if kind == "per_token":
        return case
    return replace(case, upstream=torch.where(case.targets == IGNORE_INDEX, 5.0, 0.3))


UPSTREAMS = ["per_token", "uniform"]
CASES = {
    "plain": {"bias": False},
    "bias": {"bias": True},
    "multiplier": {"bias": False, "multiplier": 0.7},
    "negative_multiplier": {"bias": False, "multiplier": -0.7},
    "softcap": {"bias": False, "softcap": 1.5},
    "bias_multiplier_softcap": {"bias": True, "multiplier": 0.25, "softcap": 2.0},
    "fewer_rows_than_a_chunk": {"n": 5, "ignored": (2,), "softcap": 1.5},
    "first_chunk_ignored": {"ignored": tuple(range(CHUNK)) + (20,)},
    "all_rows_ignored": {"n": 18, "ignored": tuple(range(18))},
}


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("params", CASES.values(), ids=CASES.keys())
def test_triton_equals_reference_fp32(params, upstream):
    case = with_upstream(make_case(**params), upstream)
    got = nll_and_grads(triton_fn(), case)
    want = nll_and_grads(ref_fn, case)
    # The same fp32 logits (the same matmul on the same chunks); another summation order over the vocabulary (an
    # online log-sum-exp in slices), an exp-based tanh (absolute error ~1e-7 * softcap) and the upstream gradient
    # applied after the matmuls instead of before: measured differences ~1e-6 on values of order 1-10; 1e-5 leaves
    # 10x margin.
    for name in want:
        torch.testing.assert_close(got[name].cpu(), want[name], rtol=1e-5, atol=1e-5, msg=name)
    ignored = case.targets == IGNORE_INDEX
    assert torch.all(got["nll"].cpu()[ignored] == 0) and torch.all(got["dh"].cpu()[ignored] == 0)


@pytest.mark.parametrize("chunk", [1, 5, 37, 64], ids=["chunk1", "chunk5_not_dividing", "chunkN", "chunk_gt_N"])
def test_chunk_size_changes_nothing_but_rounding(chunk):
    case = make_case(softcap=1.5)
    got = nll_and_grads(triton_fn(chunk), case)
    want = nll_and_grads(ref_fn, case)
    # As in test_triton_equals_reference_fp32 (fp32 matmuls over other row counts may sum in another order).
    for name in want:
        torch.testing.assert_close(got[name].cpu(), want[name], rtol=1e-5, atol=1e-5, msg=name)


class Calls:
    """Records the ``need_*`` flags of every ``lce_chunked`` call and ``compute_grad`` of every kernel launch."""

    def __init__(self, monkeypatch):
        self.chunked, self.launches = [], []
        chunked, launch = ce.lce_chunked, ce.chunk_launch

        def spy_chunked(*args, **kwargs):
            bound = inspect.signature(chunked).bind(*args, **kwargs)
            bound.apply_defaults()
            flags = {k: bound.arguments[k] for k in ("need_dh", "need_dw", "need_db")}
            self.chunked.append(flags | {"row_scale": bound.arguments["row_scale"] is not None})
            return chunked(*args, **kwargs)

        def spy_launch(*args, **kwargs):
            grid, launch_kwargs = launch(*args, **kwargs)
            self.launches.append(launch_kwargs["COMPUTE_GRAD"])
            return grid, launch_kwargs

        monkeypatch.setattr(ce, "lce_chunked", spy_chunked)
        monkeypatch.setattr(ce, "chunk_launch", spy_launch)


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_backward_recomputes_only_for_per_token_upstream(monkeypatch, upstream):
    """One upstream value on every scored row: the forward's gradients, scaled, and no second pass over the logits;
    different values: dW and db recomputed with each row weighted, dh still scaled row by row."""
    case = with_upstream(make_case(softcap=1.5), upstream)
    calls = Calls(monkeypatch)
    nll_and_grads(triton_fn(), case)
    forward = {"need_dh": True, "need_dw": True, "need_db": True, "row_scale": False}
    recompute = {"need_dh": False, "need_dw": True, "need_db": True, "row_scale": True}
    assert calls.chunked == ([forward] if upstream == "uniform" else [forward, recompute])


def test_gradients_scale_with_the_upstream_gradient():
    """``k * nll.sum()`` has ``k`` times the gradients of ``nll.sum()``, and ``nll.mean()`` ``1/N`` of them."""
    case = make_case(softcap=1.5)
    ones = nll_and_grads(triton_fn(), replace(case, upstream=torch.ones(37)))
    for factor, upstream in ((3.0, torch.full((37,), 3.0)), (1 / 37, torch.full((37,), 1 / 37))):
        scaled = nll_and_grads(triton_fn(), replace(case, upstream=upstream))
        for name in ("dh", "dw", "db"):
            # One fp32 product of the same numbers: an ulp or two.
            torch.testing.assert_close(scaled[name], ones[name] * factor, rtol=1e-6, atol=1e-7, msg=name)


def test_a_second_backward_gives_the_same_gradients():
    """The gradients kept from the forward pass are not modified by the backward (``retain_graph``)."""
    case = make_case(softcap=1.5)
    hidden, head = case.head()
    nll = triton_fn()(hidden, head, case.targets)
    grads = [torch.autograd.grad(nll.sum(), (hidden, head.weight, head.bias), retain_graph=True) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_huge_logits_stay_finite():
    """Logits of order 1000 (multiplier 100): exp overflows fp32 beyond 88, so this fails unless the log-sum-exp is
    taken relative to the running max."""
    case = make_case(multiplier=100.0)
    got = nll_and_grads(triton_fn(), case)
    want = nll_and_grads(ref_fn, case)
    for name in want:
        assert torch.isfinite(got[name]).all(), name
        # An fp32 ulp of a logit of 1000 is 6e-5; summation order moves the log-sum-exp by a few ulps, which p and
        # the x100 chain factor carry into gradients of order 100-500: the old tiled kernel measured 6.5e-3 at most.
        torch.testing.assert_close(got[name].cpu(), want[name], rtol=1e-4, atol=2e-2, msg=name)


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_error_is_at_most_twice_pytorchs(dtype, upstream):
    """Both paths in ``dtype`` against the fp32 reference on the same (rounded) inputs: the Triton path's error must
    be at most twice plain PyTorch's in that dtype (the rule of flash-attention's tests). Both round the logits and
    dS to ``dtype`` and multiply in ``dtype``; the Triton path rounds dh once more (after the upstream gradient is
    applied) and accumulates dW over chunks in fp32 (PyTorch's autograd in ``dtype``)."""
    case = with_upstream(make_case(multiplier=0.7, softcap=2.0), upstream)
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


@pytest.mark.parametrize("trained", ["hidden", "head"])
def test_gradient_only_for_inputs_that_require_it(monkeypatch, trained):
    """A frozen head (only dh is computed) or a frozen trunk (only dW and db)."""
    case = make_case(softcap=1.5)
    hidden, head = case.head()
    frozen = (head.weight, head.bias) if trained == "hidden" else (hidden,)
    for t in frozen:
        t.requires_grad_(False)
    calls = Calls(monkeypatch)
    nll = linear_cross_entropy_triton(hidden, head, case.targets, CHUNK, BLOCK_V)
    nll.sum().backward()
    want = nll_and_grads(ref_fn, replace(case, upstream=torch.ones(37)))
    assert all(t.grad is None for t in frozen)
    assert calls.chunked[0] == {"need_dh": trained == "hidden", "need_dw": trained == "head",
                                "need_db": trained == "head", "row_scale": False}
    # As in test_triton_equals_reference_fp32.
    for name, t in {"dh": hidden, "dw": head.weight, "db": head.bias}.items():
        if t.requires_grad:
            torch.testing.assert_close(t.grad, want[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
def test_no_gradient_is_computed_without_autograd(monkeypatch, mode):
    case = make_case(softcap=1.5)
    hidden, head = case.head(grad=mode != "nothing_requires_grad")
    calls = Calls(monkeypatch)
    context = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    if mode == "nothing_requires_grad":
        context = torch.enable_grad()
    with context:
        nll = linear_cross_entropy_triton(hidden, head, case.targets, CHUNK, BLOCK_V)
    assert nll.grad_fn is None and calls.launches == [False] * 5  # 37 rows in chunks of 8
    # As in test_triton_equals_reference_fp32.
    torch.testing.assert_close(nll, ref_fn(hidden, head, case.targets).detach(), rtol=1e-5, atol=1e-5)


def test_results_are_deterministic():
    case = make_case(softcap=1.5)
    first, second = nll_and_grads(triton_fn(), case), nll_and_grads(triton_fn(), case)
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_triton_holds_one_chunk_of_logits_at_most(upstream):
    """Forward and backward allocate nothing larger than one chunk of logits and the inputs' gradients: here the
    weight's (300 x 16 fp32) is the largest, a chunk of logits is half of it, and N x V logits would be 2.5x."""
    n, c, v = 40, 16, 300
    case = with_upstream(make_case(n=n, c=c, v=v, softcap=1.5), upstream)
    with LargestTensor() as largest:
        nll_and_grads(triton_fn(8, 64), case)
    assert largest.nbytes == 4 * v * c < 4 * n * v


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["no_softcap", "softcap30"])
def test_llama3_sized_vocabulary_on_gpu(softcap):
    """bf16 at a Llama-3 vocabulary (128256) and hidden size 2048, 4096 tokens in chunks of 1024: within twice
    PyTorch's bf16 error of the fp32 reference, and no N x V logits in the peak memory."""
    n, c, v, chunk = 4096, 2048, 128256, 1024
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
    kernel = run(lambda h, head, t: linear_cross_entropy_triton(h, head, t, chunk), torch.bfloat16)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # bf16 inputs, the kept bf16 dh and fp32 dW, the returned bf16 gradients, a bf16 temporary of dW's size (where
    # cuBLAS cannot accumulate into fp32) and one chunk of bf16 logits; the slack (a quarter of one bf16 N x V
    # logit matrix, 263 MB) is far below what materialised logits would add.
    assert peak < (n + v) * c * (2 + 2 + 4 + 2 + 2) + chunk * v * 2 + n * v * 2 // 4, peak
    exact = run(lambda h, head, t: linear_cross_entropy_ref(h, head, t, 1024), torch.float32)
    torch_ = run(lambda h, head, t: linear_cross_entropy_ref(h, head, t, 1024), torch.bfloat16)
    for name, k, e, p in zip(("nll", "dh", "dw"), kernel, exact, torch_):
        # As in test_half_precision_error_is_at_most_twice_pytorchs.
        assert (k.float() - e).abs().max() <= 2 * (p.float() - e).abs().max() + 1e-5, name
