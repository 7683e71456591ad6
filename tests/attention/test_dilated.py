"""dilated on a tiny Llama: equal to the unpatched model given the definition as a 4D mask, dilation 1 is the
sliding window, decode == full forward, and clear errors."""

import pytest
import torch

import lce
from lce.errors import ConfigError
from tests.attention.test_blockwise import definition_mask
from tests.conftest import assert_decode_matches_full, logits, make_tiny_llama

IDS = torch.randint(3, 259, (2, 29), generator=torch.Generator().manual_seed(4))
POS = torch.arange(29)[None].expand(2, -1)


def dilated(window, dilation, **extra):
    return {"name": "dilated", "window": window, "dilation": dilation, "query_block": 8, **extra}


@pytest.mark.parametrize("window,dilation", [(4, 2), (3, 5), (30, 3)], ids=["w4_d2", "w3_d5", "strided_d3"])
def test_equals_the_unpatched_model_with_the_pattern_as_a_mask(window, dilation):
    model = lce.patch(make_tiny_llama(), "rope", attention=dilated(window, dilation))
    mask = definition_mask(lambda i, j: ((i - j) % dilation == 0) & (i - j < window * dilation), POS, POS)
    reference = logits(make_tiny_llama(), IDS, attention_mask=mask)
    torch.testing.assert_close(logits(model, IDS), reference, atol=2e-5, rtol=2e-5)  # fp32 summation order


def test_dilation_one_is_the_sliding_window():
    model = lce.patch(make_tiny_llama(), "rope", attention=dilated(5, 1))
    window = lce.patch(make_tiny_llama(), "rope", attention={"name": "sliding_window", "window": 5, "query_block": 8})
    assert torch.equal(logits(model, IDS), logits(window, IDS))  # same keys scored, same order


def test_decode_matches_full_forward():
    model = lce.patch(make_tiny_llama(), "rope", attention=dilated(4, 3))
    assert_decode_matches_full(model, IDS, prefill=11)


@pytest.mark.parametrize("params,message", [({"window": 0}, r"attention\.window: must be >= 1"),
                                            ({"dilation": 0}, r"attention\.dilation: must be >= 1")])
def test_bad_parameters_are_clear_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        lce.patch(make_tiny_llama(), "rope", attention={"name": "dilated", **params})
