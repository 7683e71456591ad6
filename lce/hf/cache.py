"""Where transformers keeps the KV cache in a call and in its output.

transformers >= 5.24 passes the cache to model, layer and attention forwards as ``cache=`` and returns it as
``output.cache``; earlier versions use ``past_key_values`` (``past_key_value`` / ``layer_past`` in some attention
modules). 5.24 and 5.25 still accept and return the old name with a FutureWarning ("removed in 5.40"), so code that
keeps using it works today and breaks silently later; lce asks the model which name it takes instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

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
