"""lce finds the KV cache under the name the installed transformers uses (``cache`` since 5.24, ``past_key_values``
before), in calls and in outputs; ``RecurrentStateLayer`` keeps a recurrent state exactly while it describes the
cached keys and values (carried over appends, forgotten on any other change)."""

import copy
import inspect
import pickle

import pytest
import torch
import transformers
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from lce.errors import UnsupportedModelError
from lce.hf.cache import (
    NoStateKept,
    RecurrentStateLayer,
    cache_from_call,
    cache_keyword,
    partial_cache_layers,
    recurrent_state_layer,
    returned_cache,
)
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


def dynamic_cache(*layers):
    """A ``DynamicCache`` made of ``layers``."""
    cache = DynamicCache()
    cache.layers = list(layers)
    return cache


def kv(length, batch=2, seed=0):
    """Keys and values ``[B, HKV=2, length, D=4]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 4, generator=g), torch.randn(batch, 2, length, 4, generator=g)


def layer_with_state(length=5):
    """A ``RecurrentStateLayer`` adopted from a filled ``DynamicLayer``, keeping a state over its ``length`` entries."""
    cache = dynamic_cache(DynamicLayer())
    cache.update(*kv(length), 0)
    layer = recurrent_state_layer({"cache": cache}, 0)
    layer.keep_recurrent_state("state", layer.keys, layer.values)
    return cache, layer


def test_a_dynamic_layer_is_adopted_with_its_tensors_and_kept():
    cache = dynamic_cache(DynamicLayer(), DynamicLayer())
    cache.update(*kv(3), 1)
    keys = cache.layers[1].keys
    layer = recurrent_state_layer({"past_key_values": cache, "use_cache": True}, 1)
    assert isinstance(layer, RecurrentStateLayer) and cache.layers[1] is layer and layer.keys is keys
    assert recurrent_state_layer({"cache": cache}, 1) is layer  # adopted once
    assert cache.get_seq_length(1) == 3 and layer.recurrent_state(3) is None  # no state until one is kept


def test_the_state_is_carried_over_appends():
    cache, layer = layer_with_state(5)
    assert layer.recurrent_state(5) == "state" and layer.recurrent_state(4) is None
    keys, values = cache.update(*kv(1, seed=1), 0)
    assert keys.shape[2] == 6 and layer.recurrent_state(5) == "state"  # the state of the first 5 of 6 positions
    layer.keep_recurrent_state("next", keys, values)
    assert layer.recurrent_state(6) == "next" and layer.recurrent_state(5) is None


@pytest.mark.parametrize("change", [
    lambda cache, layer: cache.crop(-2),
    lambda cache, layer: cache.reorder_cache(torch.tensor([1, 0])),
    lambda cache, layer: cache.batch_select_indices(torch.tensor([0])),
    lambda cache, layer: cache.batch_repeat_interleave(2),
    lambda cache, layer: cache.reset(),
    lambda cache, layer: layer.keys.mul_(2),
    lambda cache, layer: setattr(layer, "values", layer.values.clone()),
], ids=["crop", "reorder", "batch-select", "batch-repeat", "reset", "in-place-write", "replaced"])
def test_any_other_change_forgets_the_state(change):
    cache, layer = layer_with_state(5)
    change(cache, layer)
    assert all(layer.recurrent_state(n) is None for n in range(11))
    if layer.keys is not None:
        cache.update(*kv(1, batch=layer.keys.shape[0], seed=1), 0)
        assert all(layer.recurrent_state(n) is None for n in range(12))  # and an append does not bring it back


def test_a_state_over_tensors_the_layer_does_not_hold_is_not_kept():
    _, layer = layer_with_state(5)
    layer.keep_recurrent_state("copy", layer.keys.clone(), layer.values)
    assert layer.recurrent_state(5) == "state"


def test_copies_and_pickles_keep_the_tensors_without_the_state():
    cache, layer = layer_with_state(5)
    for other in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert isinstance(other.layers[0], RecurrentStateLayer) and other.layers[0].recurrent_state(5) is None
        torch.testing.assert_close(other.layers[0].keys, layer.keys, rtol=0, atol=0)
    assert layer.recurrent_state(5) == "state"


def test_layers_that_cannot_keep_a_state_and_calls_without_a_cache():
    cache = dynamic_cache(DynamicSlidingWindowLayer(sliding_window=4))
    assert isinstance(recurrent_state_layer({"cache": cache}, 0), NoStateKept)
    assert type(cache.layers[0]) is DynamicSlidingWindowLayer  # left alone
    assert recurrent_state_layer({"use_cache": False}, 0) is None
    with pytest.raises(UnsupportedModelError, match="DynamicCache passed to layer 3 has no per-layer keys"):
        recurrent_state_layer({"cache": dynamic_cache(DynamicLayer())}, 3)


def test_a_model_decodes_through_adopted_layers():
    """The adopted layers are full-attention cache layers to transformers: a plain model decodes through them as
    through the ``DynamicLayer`` they replaced."""
    model = make_tiny_llama()
    ids = torch.randint(3, 259, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = returned_cache(model(ids[:, :8], use_cache=True))
        for index in range(len(cache.layers)):
            recurrent_state_layer({"cache": cache}, index)
        out = model(ids[:, 8:], use_cache=True, **{cache_keyword(model): cache})
    assert all(isinstance(layer, RecurrentStateLayer) for layer in cache.layers) and cache.get_seq_length() == 9
    torch.testing.assert_close(out.logits[:, -1], model(ids).logits[:, -1], atol=1e-5, rtol=1e-5)  # fp32 order


def test_partial_cache_layers_are_the_windowed_ones():
    config = transformers.MistralConfig(num_hidden_layers=3, sliding_window=8)
    assert partial_cache_layers(config, [0, 2]) == [(0, "sliding_attention", {"sliding_window": 8}),
                                                    (2, "sliding_attention", {"sliding_window": 8})]
    assert partial_cache_layers(make_tiny_llama().config, [0, 1]) == []
