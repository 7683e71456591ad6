"""The public ``linear_cross_entropy``: backend dispatch, autocast, empty inputs, and clear errors for bad input."""

import pytest
import torch

from lce.errors import LceError
from lce.kernels.backend import use_backend
from lce.kernels.cross_entropy import IGNORE_INDEX, LogitHead, linear_cross_entropy, linear_cross_entropy_ref
from lce.kernels.cross_entropy.function import linear_cross_entropy_triton
from tests.kernels.cross_entropy.cases import make_case


def test_auto_on_cpu_is_the_reference_bit_for_bit(monkeypatch):
    monkeypatch.delenv("LCE_BACKEND", raising=False)
    case = make_case(softcap=1.5, multiplier=0.7)
    hidden, head = case.head(grad=False)
    assert torch.equal(linear_cross_entropy(hidden, head, case.targets, chunk_size=8),
                       linear_cross_entropy_ref(hidden, head, case.targets, 8))


def test_use_backend_triton_runs_the_kernel_under_inference_mode():
    """As ``lce.eval.perplexity`` calls it."""
    case = make_case(n=9, v=20, c=16, softcap=1.5)
    hidden, head = case.head(grad=False)
    with use_backend("triton"), torch.inference_mode():
        got = linear_cross_entropy(hidden, head, case.targets)
    # As in test_triton.py::test_triton_equals_reference_fp32.
    torch.testing.assert_close(got, linear_cross_entropy_ref(hidden, head, case.targets), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_empty_input_gives_empty_output_and_zero_gradients(backend):
    hidden = torch.zeros(0, 16, requires_grad=True)
    weight = torch.randn(20, 16, requires_grad=True)
    nll = linear_cross_entropy(hidden, LogitHead(weight), torch.zeros(0, dtype=torch.long), backend=backend)
    assert nll.shape == (0,) and nll.dtype == torch.float32
    nll.sum().backward()
    assert weight.grad is None or torch.all(weight.grad == 0)


def test_autocast_casts_to_its_dtype_and_gradients_keep_the_parameters_dtype():
    case = make_case(bias=True, softcap=1.5)
    hidden, head = case.head()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll = linear_cross_entropy(hidden, head, case.targets, backend="triton")
    nll.sum().backward()
    hidden_bf16, head_bf16 = case.head(torch.bfloat16, grad=False)
    # The same kernel on the same bf16 inputs: only fp32 summation order may differ.
    torch.testing.assert_close(nll, linear_cross_entropy_triton(hidden_bf16, head_bf16, case.targets),
                               rtol=1e-6, atol=1e-6)
    assert hidden.grad.dtype == head.weight.grad.dtype == head.bias.grad.dtype == torch.float32


def good_inputs():
    case = make_case(n=6, c=8, v=10, ignored=(1,))
    hidden, head = case.head(grad=False)
    return hidden, head, case.targets


def with_targets(values):
    hidden, head, _ = good_inputs()
    return hidden, head, torch.tensor(values)


BAD_INPUTS = {
    "head_not_a_logit_head": (lambda: (good_inputs()[0], torch.nn.Linear(8, 10), good_inputs()[2]),
                              "head must be a lce.kernels.cross_entropy.LogitHead, got Linear"),
    "hidden_width": (lambda: (torch.zeros(6, 9), *good_inputs()[1:]), r"C = 8 .*got \[6, 9\]"),
    "hidden_3d": (lambda: (torch.zeros(1, 6, 8), *good_inputs()[1:]), r"hidden must be \[N, C\]"),
    "targets_length": (lambda: with_targets([0, 1, 2]), r"targets must be \[N\] = \[6\].*got \[3\]"),
    "targets_float": (lambda: with_targets([0.0] * 6), "integer token ids, got torch.float32"),
    "target_too_large": (lambda: with_targets([0, 1, 10, 3, 4, 5]), r"targets\[2\] = 10 .*0\.\.\.9.*-100"),
    "target_negative": (lambda: with_targets([0, 1, 2, -5, 4, 5]), r"targets\[3\] = -5"),
    "float64": (lambda: (good_inputs()[0].double(), *good_inputs()[1:]), "hidden has dtype torch.float64; allowed"),
    "mixed_dtypes": (lambda: (good_inputs()[0].bfloat16(), *good_inputs()[1:]),
                     "share one dtype.*'hidden': torch.bfloat16.*'head.weight': torch.float32"),
}


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("make, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_are_clear_errors(make, message, backend):
    hidden, head, targets = make()
    with pytest.raises(LceError, match=message):
        linear_cross_entropy(hidden, head, targets, backend=backend)


def test_bad_chunk_size_and_block_are_clear_errors():
    hidden, head, targets = good_inputs()
    for backend in ("ref", "triton"):
        with pytest.raises(LceError, match="chunk_size must be at least 1, got 0"):
            linear_cross_entropy(hidden, head, targets, backend=backend, chunk_size=0)
    with pytest.raises(LceError, match="chunk_size must be at least 1, got -1"):
        linear_cross_entropy_triton(hidden, head, targets, chunk_size=-1)
    with pytest.raises(LceError, match="block_v .* must be a power of two >= 16, got 24"):
        linear_cross_entropy_triton(hidden, head, targets, block_v=24)


def test_bad_heads_are_clear_errors():
    weight = torch.zeros(10, 8)
    with pytest.raises(LceError, match=r"bias must be \[V\] = \[10\].*got \(8,\)"):
        LogitHead(weight, torch.zeros(8))
    with pytest.raises(LceError, match=r"weight must be a floating \[V, C\] tensor, got torch.float32 \(10,\)"):
        LogitHead(torch.zeros(10))
    with pytest.raises(LceError, match="softcap must be a positive finite number or None, got 0.0"):
        LogitHead(weight, softcap=0.0)
    with pytest.raises(LceError, match="multiplier must be a finite number, got nan"):
        LogitHead(weight, multiplier=float("nan"))


def test_ignore_index_is_minus_100():
    """The value ``F.cross_entropy`` and Hugging Face labels use for positions that are not scored."""
    assert IGNORE_INDEX == -100
