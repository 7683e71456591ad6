"""Chunked next-token NLL against the model's own full-logits loss, forward and backward."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lce.eval.loss import shifted_targets, token_nll
from lce.hf.lm import hidden_states, logits_from_hidden
from tests.conftest import make_tiny_llama

T = 13  # odd, so most chunk sizes do not divide N = 2 * T


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 259, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "chunk_size", [1, 5, 2 * T, 2 * T + 7], ids=["chunk1", "chunk5_not_dividing", "chunkN", "chunk_gt_N"]
)
def test_chunked_nll_equals_full_cross_entropy(model, input_ids, chunk_size):
    targets = shifted_targets(input_ids).flatten()
    with torch.no_grad():
        full = F.cross_entropy(model(input_ids).logits.flatten(0, 1).float(), targets, reduction="none")
        hidden = hidden_states(model, input_ids).flatten(0, 1)
        chunked = token_nll(partial(logits_from_hidden, model), hidden, targets, chunk_size)
    assert chunked.dtype == torch.float32 and chunked.shape == (2 * T,)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [4, 2 * T + 1], ids=["chunk4", "chunk_gt_N"])
def test_chunked_nll_gradients_equal_full_loss_gradients(model, chunk_size):
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(2 * T, model.config.hidden_size, generator=generator)
    targets = torch.randint(0, 259, (2 * T,), generator=generator)
    targets[3] = -100
    logits_fn = partial(logits_from_hidden, model)

    full_hidden = hidden.clone().requires_grad_()
    model.zero_grad()
    F.cross_entropy(logits_fn(full_hidden).float(), targets, reduction="sum").backward()
    full_weight_grad = model.get_output_embeddings().weight.grad.clone()

    chunked_hidden = hidden.clone().requires_grad_()
    model.zero_grad()
    token_nll(logits_fn, chunked_hidden, targets, chunk_size).sum().backward()
    chunked_weight_grad = model.get_output_embeddings().weight.grad.clone()
    model.zero_grad()

    torch.testing.assert_close(chunked_hidden.grad, full_hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_weight_grad, full_weight_grad, rtol=1e-5, atol=1e-6)
    assert torch.all(chunked_hidden.grad[3] == 0)


def test_ignored_positions_score_zero(model, input_ids):
    labels = input_ids.clone()
    labels[0, 4] = -100
    targets = shifted_targets(input_ids, labels)
    assert torch.all(targets[:, -1] == -100) and targets[0, 3] == -100
    with torch.no_grad():
        hidden = hidden_states(model, input_ids)
        nll = token_nll(partial(logits_from_hidden, model), hidden.flatten(0, 1), targets.flatten(), 4).view(2, T)
    assert torch.all(nll[:, -1] == 0) and nll[0, 3] == 0
    assert torch.all(nll[:, :-1][targets[:, :-1] != -100] > 0)


def test_shifted_targets_are_next_tokens():
    ids = torch.tensor([[5, 6, 7]])
    assert shifted_targets(ids).tolist() == [[6, 7, -100]]


def test_logit_head_path_equals_the_generic_path_on_cpu(model, input_ids):
    """A ``LogitHead`` runs the reference on CPU: the same numbers as the generic callable, forward and backward."""
    from lce.hf.adapters import adapter_for

    targets = shifted_targets(input_ids).flatten()
    hidden = hidden_states(model, input_ids).flatten(0, 1).detach()
    head = adapter_for(model).logit_head(model)
    results = []
    for logits_fn in (partial(logits_from_hidden, model), head):
        h = hidden.clone().requires_grad_()
        model.zero_grad()
        nll = token_nll(logits_fn, h, targets, chunk_size=5)
        nll.sum().backward()
        results.append((nll, h.grad, head.weight.grad.clone()))
    model.zero_grad()
    assert all(torch.equal(generic, fused) for generic, fused in zip(*results))


def test_logit_head_path_runs_the_fused_kernel_under_the_triton_backend(model, input_ids):
    from lce.hf.adapters import adapter_for
    from lce.kernels.backend import use_backend

    targets = shifted_targets(input_ids).flatten()
    with torch.no_grad():
        hidden = hidden_states(model, input_ids).flatten(0, 1)
        generic = token_nll(partial(logits_from_hidden, model), hidden, targets)
        with use_backend("triton"):
            fused = token_nll(adapter_for(model).logit_head(model), hidden, targets)
    # fp32 in both; tiles sum in another order (as tests/kernels/cross_entropy/test_triton.py).
    torch.testing.assert_close(fused, generic, rtol=1e-5, atol=1e-5)
