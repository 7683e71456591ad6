"""The chunked reference against the formula written out in float64 with all logits at once, forward and backward;
chunking never holds more than chunk_size x V logits."""

import pytest
import torch

from lce.kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy_ref
from tests.kernels.cross_entropy.cases import LargestTensor, make_case, nll_and_grads


def formula(hidden, head, targets):
    """``nll = logsumexp(z) - z[target]`` with ``z = c * tanh(m * (h W^T + b) / c)``, in float64, 0 where ignored."""
    s = hidden.double() @ head.weight.double().T
    if head.bias is not None:
        s = s + head.bias.double()
    z = s * head.multiplier
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    scored = targets != IGNORE_INDEX
    picked = z.gather(1, torch.where(scored, targets, 0)[:, None])[:, 0]
    return torch.where(scored, torch.logsumexp(z, dim=1) - picked, 0.0)


CASES = {
    "plain": {"bias": False},
    "bias": {"bias": True},
    "multiplier_softcap": {"multiplier": 0.7, "softcap": 1.5},
}


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 64], ids=["chunk1", "chunk5_not_dividing", "chunkN", "chunk_gt_N"])
@pytest.mark.parametrize("params", CASES.values(), ids=CASES.keys())
def test_reference_equals_the_formula(params, chunk_size):
    case = make_case(**params)
    got = nll_and_grads(lambda h, head, t: linear_cross_entropy_ref(h, head, t, chunk_size), case)
    want = nll_and_grads(formula, case)
    # fp32 logits and log-softmax against float64: a few fp32 ulps of values of order 1-10.
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
    ignored = case.targets == IGNORE_INDEX
    assert torch.all(got["nll"][ignored] == 0) and torch.all(got["dh"][ignored] == 0)


def test_reference_never_holds_more_than_a_chunk_of_logits():
    case = make_case(n=40, c=16, v=300)
    chunk = 8
    with LargestTensor() as largest:
        nll_and_grads(lambda h, head, t: linear_cross_entropy_ref(h, head, t, chunk), case)
    # The largest tensors are a chunk of fp32 logits (8 x 300) and the weight's gradient (300 x 16), never N x V.
    assert largest.nbytes == 4 * max(chunk * 300, 300 * 16) < 4 * 40 * 300
