"""lce finds the KV cache under the name the installed transformers uses (``cache`` since 5.24, ``past_key_values``
before), in calls and in outputs."""

import inspect

import torch

from lce.hf.cache import cache_from_call, cache_keyword, returned_cache
from tests.conftest import make_tiny_llama


def test_the_keyword_is_the_one_the_forward_declares():
    model = make_tiny_llama()
    declared = inspect.signature(model.forward).parameters
    assert cache_keyword(model) in declared
    assert cache_keyword(model.model) in inspect.signature(model.model.forward).parameters


def test_a_cache_passed_under_its_keyword_is_used_and_returned():
    model = make_tiny_llama()
    ids = torch.randint(3, 259, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = returned_cache(model(ids[:, :8], use_cache=True))
        assert cache.get_seq_length() == 8
        out = model(ids[:, 8:], use_cache=True, **{cache_keyword(model): cache})
    assert returned_cache(out) is cache and cache.get_seq_length() == 9
    torch.testing.assert_close(out.logits[:, -1], model(ids).logits[:, -1], atol=1e-5, rtol=1e-5)  # fp32 order


def test_every_name_is_found_in_a_call():
    marker = object()
    for name in ("cache", "past_key_values", "past_key_value", "layer_past"):
        assert cache_from_call({name: marker, "use_cache": True}) is marker
    assert cache_from_call({"cache": None, "past_key_values": marker}) is marker
    assert cache_from_call({"use_cache": True}) is None
