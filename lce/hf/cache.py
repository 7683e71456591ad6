"""transformers' KV cache as lce uses it: where it is in a call and in its output, and the recurrent state of
linear attention kept on its layers. The rest of lce asks this module and knows no cache class or keyword.

transformers >= 5.24 passes the cache to model, layer and attention forwards as ``cache=`` and returns it as
``output.cache``; earlier versions use ``past_key_values`` (``past_key_value`` / ``layer_past`` in some attention
modules). 5.24 and 5.25 accept and return the old name with a FutureWarning ("removed in 5.40"), so code that
keeps using it would break silently with 5.40; lce asks the model which name it takes instead.

Attention functions do not receive the cache, so an attention layer that keeps a recurrent state across calls (linear
attention decoding, ``lce.attention.linear``) finds its cache layer from the attention module's call, in a forward
pre-hook, through ``recurrent_state_layer``; the state then lives on that layer (``RecurrentStateLayer``) and dies
with the cache, so two generations never share one.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from lce.errors import UnsupportedModelError

#: Names a forward may receive the KV cache under, newest first.
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


def cache_keyword(module: nn.Module) -> str:
    """The keyword ``module.forward`` takes its KV cache by: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    parameters = inspect.signature(module.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_from_call(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache among a forward's keyword arguments (any of ``CACHE_ARGUMENTS``), or None."""
    return next((kwargs[name] for name in CACHE_ARGUMENTS if kwargs.get(name) is not None), None)


def returned_cache(output: Any) -> Any:
    """The KV cache a forward returned: ``output.cache`` where the output class has that field, else
    ``output.past_key_values`` (read without the deprecation warning of the alias newer versions keep)."""
    fields = getattr(output, "__dataclass_fields__", {})
    return output.cache if "cache" in fields else output.past_key_values


# Recurrent states kept on the KV cache (linear attention decoding).


def _version(tensor: torch.Tensor) -> int | None:
    return None if tensor.is_inference() else tensor._version  # inference tensors keep no version counter


@dataclass(frozen=True)
class _Saved:
    """A recurrent state after the first ``length`` cached positions and the cached tensors it was computed from."""

    state: Any
    length: int
    keys: weakref.ref
    values: weakref.ref
    versions: tuple[int | None, int | None]

    @classmethod
    def of(cls, state: Any, length: int, keys: torch.Tensor, values: torch.Tensor) -> _Saved:
        return cls(state, length, weakref.ref(keys), weakref.ref(values), (_version(keys), _version(values)))

    def holds(self, keys: torch.Tensor | None, values: torch.Tensor | None) -> bool:
        """Whether ``keys``/``values`` are the very tensors the state was computed from, unmodified."""
        return (keys is not None and values is not None and self.keys() is keys and self.values() is values
                and (_version(keys), _version(values)) == self.versions)


class RecurrentStateLayer(DynamicLayer):
    """A full-attention cache layer (transformers' ``DynamicLayer``) that also keeps a recurrent state of its layer's
    attention over a prefix of the cached positions, the way flash-linear-attention keeps states in its cache.

    The state is opaque here (``lce.attention.linear.LinearState``); what this layer guarantees is that the state it
    returns describes exactly the cached keys and values it is asked about. ``DynamicLayer`` replaces its tensors on
    every update, crop, beam reorder, batch selection and reset, and writing into a tensor bumps its version, so the
    state is kept while the layer holds the very tensors it was computed from (identity and version) and forgotten
    on any other change. An update appends positions: the state still describes a prefix and is carried over. Copies
    and pickles of the layer start without a state (the cached tensors are enough to recompute it).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._saved: _Saved | None = None

    @classmethod
    def adopt(cls, layer: DynamicLayer) -> RecurrentStateLayer:
        """A ``RecurrentStateLayer`` holding ``layer``'s cached keys and values (and no state)."""
        adopted = cls.__new__(cls)
        adopted.__dict__.update(layer.__dict__)
        adopted._saved = None
        return adopted

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append as ``DynamicLayer.update`` does, carrying over a state that still describes the cached prefix."""
        kept = self._saved if self._saved is not None and self._saved.holds(self.keys, self.values) else None
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self._saved = None if kept is None else _Saved.of(kept.state, kept.length, keys, values)
        return keys, values

    def recurrent_state(self, length: int) -> Any | None:
        """The state after the first ``length`` cached positions, or None when there is none to continue from."""
        saved = self._saved
        if saved is None or saved.length != length or not saved.holds(self.keys, self.values):
            return None
        return saved.state

    def keep_recurrent_state(self, state: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep ``state``, computed over all of ``keys``/``values``, if they are the tensors this layer caches."""
        if self.keys is keys and self.values is values:
            self._saved = _Saved.of(state, keys.shape[-2], keys, values)

    def __getstate__(self):
        return {**self.__dict__, "_saved": None}


class NoStateKept:
    """Stands for a cache layer that cannot keep a recurrent state (static, quantized, evicting or any other kind
    than ``DynamicLayer``): its user recomputes the state from the cached keys and values at every call."""

    def recurrent_state(self, length: int) -> None:
        return None

    def keep_recurrent_state(self, state: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
        pass


def recurrent_state_layer(kwargs: Mapping[str, Any], layer_index: int) -> RecurrentStateLayer | NoStateKept | None:
    """The cache layer of an attention module's call (its forward's keyword arguments, before the cache update)
    through which the layer's recurrent state is kept, or None when the call has no KV cache.

    A plain ``DynamicLayer`` (what ``DynamicCache`` builds for full-attention layers) is replaced in the cache by a
    ``RecurrentStateLayer`` holding the same tensors; any other kind of layer is left alone (``NoStateKept``).

    Raises:
        UnsupportedModelError: the cache has no per-layer keys and values lce can follow.
    """
    cache = cache_from_call(kwargs)
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    if layers is None or not 0 <= layer_index < len(layers):
        raise UnsupportedModelError(
            f"a recurrent state (linear attention) is kept per KV cache layer, but the {type(cache).__name__} passed "
            f"to layer {layer_index} has no per-layer keys and values lce can follow; decode with transformers' "
            "DynamicCache (the default)"
        )
    layer = layers[layer_index]
    if isinstance(layer, RecurrentStateLayer):
        return layer
    if type(layer) is DynamicLayer and isinstance(layers, list):
        layers[layer_index] = RecurrentStateLayer.adopt(layer)
        return layers[layer_index]
    return NoStateKept()


def partial_cache_layers(config: Any, layers: list[int]) -> list[tuple[int, str, dict[str, Any]]]:
    """The decoder layers among ``layers`` whose KV cache, as transformers' ``DynamicCache`` builds it from
    ``config``, does not keep every past key and value: ``(index, layer type, its cache layer's arguments)``, e.g.
    ``(0, "sliding_attention", {"sliding_window": 8})``. Empty when this transformers has no per-layer cache types."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:
        return []
    types, arguments = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return [(i, types[i], arguments[i]) for i in layers if types[i] != "full_attention"]
