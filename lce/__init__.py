"""lce: long-context extrapolation toolkit.

Patch a Hugging Face model's position encoding or attention per instance, train it at a short context, and measure
how far beyond its training length it still works.

    >>> import lce
    >>> model, tokenizer = lce.load_model("tiny_llama")
    >>> lce.patch(model, "nope")        # or a dict {"name": ..., ...}, or a config object
    >>> lce.unpatch(model)

The names below are imported on first use, so that ``import lce.config`` (the ``lce`` command checks a configuration
with it before anything else) does not pay for torch and transformers.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ATTENTIONS": "lce.attention",
    "ConfigError": "lce.errors",
    "LceError": "lce.errors",
    "MODELS": "lce.hf.models",
    "POSENCS": "lce.posenc",
    "UnsupportedModelError": "lce.errors",
    "load_model": "lce.hf.models",
    "patch": "lce.hf.patch",
    "patch_spec": "lce.hf.patch",
    "save_model": "lce.hf.models",
    "unpatch": "lce.hf.patch",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lce' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


def list_posencs() -> list[str]:
    """Names of the registered position encodings (the option files of ``conf/posenc/``)."""
    return __getattr__("POSENCS").names()


def list_attentions() -> list[str]:
    """Names of the registered attention variants (the option files of ``conf/attention/``)."""
    return __getattr__("ATTENTIONS").names()


__all__ = [
    "ATTENTIONS", "MODELS", "POSENCS", "ConfigError", "LceError", "UnsupportedModelError", "list_attentions",
    "list_posencs", "load_model", "patch", "patch_spec", "save_model", "unpatch",
]
