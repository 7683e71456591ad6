"""The fused Triton path of lce's dispatcher: a patched model computes the same logits whichever backend runs.

Under ``use_backend("triton")`` the dispatcher hands every layer to ``lce.kernels.attention.flash_attention`` (here
in Triton's CPU interpreter); under ``ref`` the methods' PyTorch kernels run. Both must give the same model, for every
position encoding with a fused form and every restriction with a kernel pattern, and calls the fused kernel does not
cover (padding masks) must fall back to the PyTorch kernel rather than compute something else.
"""

import pytest
import torch

import lce
from lce.hf import dispatch
from lce.kernels.backend import use_backend
from tests.conftest import decode_logits, logits, make_tiny_llama

IDS = torch.randint(3, 259, (1, 40), generator=torch.Generator().manual_seed(0))

# fp32 both ways; the kernel's online softmax sums in another order than the PyTorch kernels: 1e-5 on logits of
# magnitude ~1 after two layers.
TOL = {"atol": 1e-5, "rtol": 1e-5}

CASES = {
    "logn": {"posenc": {"name": "logn", "logn_length": 8}},
    "alibi": {"posenc": "alibi"},
    "dca": {"posenc": {"name": "dca", "chunk_size": 12, "local_window": 4}},
    "dca_paper": {"posenc": {"name": "dca", "chunk_size": 10, "local_window": 3, "convention": "paper",
                              "pretraining_length": 16}},
    "self_extend": {"posenc": {"name": "self_extend", "group_size": 3, "neighbor_window": 8}},
    "rerope": {"posenc": {"name": "rerope", "window": 6}},
    "sinks": {"posenc": {"name": "sinks", "start_size": 2, "recent_size": 9}},
    "sliding_window": {"posenc": "rope", "attention": {"name": "sliding_window", "window": 7}},
    "local_global": {"posenc": "rope", "attention": {"name": "local_global", "window": 7, "global_tokens": [0, 1]}},
    "block_sparse": {"posenc": "rope", "attention": {"name": "block_sparse", "block_size": 8, "window_blocks": 1,
                                                   "global_blocks": 1, "random_blocks": 1}},
    "alibi_window": {"posenc": "alibi", "attention": {"name": "sliding_window", "window": 7, "sink_tokens": 2}},
    "dca_window": {"posenc": {"name": "dca", "chunk_size": 12, "local_window": 4},
                       "attention": {"name": "sliding_window", "window": 9}},
}


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls that reach the fused kernel."""
    calls = []
    original = dispatch.flash_attention

    def counting(*args, **kwargs):
        calls.append(args[3])
        return original(*args, **kwargs)

    monkeypatch.setattr(dispatch, "flash_attention", counting)
    return calls


def patched(case: str):
    model = make_tiny_llama()
    lce.patch(model, **CASES[case])
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_triton_backend_computes_the_same_model(case, fused_calls):
    model = patched(case)
    with use_backend("ref"):
        expected = logits(model, IDS)
    assert not fused_calls
    with use_backend("triton"):
        got = logits(model, IDS)
    assert len(fused_calls) == model.config.num_hidden_layers  # every layer took the fused kernel
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("case", ["dca", "alibi", "sinks"])
def test_triton_backend_decodes_like_its_full_forward(case, fused_calls):
    model = patched(case)
    with use_backend("triton"):
        full = logits(model, IDS[:, :24])
        decoded = decode_logits(model, IDS[:, :24], prefill=17)
    assert fused_calls
    # Token-by-token decoding sums the same terms in another order (one query row at a time).
    torch.testing.assert_close(decoded, full, **TOL)


def test_padded_batches_fall_back_to_the_pytorch_kernel(fused_calls):
    model = patched("dca")
    ids = IDS[:, :20].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: transformers passes a boolean mask, which the fused kernel does not take
    with use_backend("ref"):
        expected = logits(model, ids, attention_mask=mask)
    with use_backend("triton"):
        got = logits(model, ids, attention_mask=mask)
    assert not fused_calls
    # The PyTorch attention kernel runs both times; only RoPE differs (its Triton kernel under the triton backend).
    torch.testing.assert_close(got, expected, **TOL)


def test_restrictions_without_a_kernel_form_fall_back(fused_calls):
    model = make_tiny_llama()
    lce.patch(model, "rope", attention={"name": "local_global", "window": 7, "global_tokens": [3]})
    with use_backend("triton"):
        logits(model, IDS)
    assert not fused_calls
