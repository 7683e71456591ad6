"""lce: long-context extrapolation toolkit.

Patch a Hugging Face model's position encoding or attention per instance, train it at a short context, and measure
how far beyond its training length it still works.

    >>> import lce
    >>> model, tokenizer = lce.load_model("tiny_llama")
    >>> lce.patch(model, "nope")        # or a dict {"name": ..., ...}, or a config object
    >>> lce.unpatch(model)
"""

from lce.attention import ATTENTIONS
from lce.errors import ConfigError, LceError, UnsupportedModelError
from lce.hf.models import MODELS, load_model, save_model
from lce.hf.patch import patch, patch_spec, unpatch
from lce.posenc import POSENCS

__version__ = "0.1.0"


def list_posencs() -> list[str]:
    """Names of the registered position encodings (the option files of ``conf/posenc/``)."""
    return POSENCS.names()


def list_attentions() -> list[str]:
    """Names of the registered attention variants (the option files of ``conf/attention/``)."""
    return ATTENTIONS.names()


__all__ = [
    "ATTENTIONS", "MODELS", "POSENCS", "ConfigError", "LceError", "UnsupportedModelError", "list_attentions",
    "list_posencs", "load_model", "patch", "patch_spec", "save_model", "unpatch",
]
