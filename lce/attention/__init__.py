"""Attention variants registered by name in ``ATTENTIONS`` (every module of this package is imported here)."""

import importlib
import pkgutil

from lce.attention.base import ATTENTIONS, AttentionVariant

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ATTENTIONS", "AttentionVariant"]
