"""Attention variants registered by name in ``ATTENTIONS``."""

from lce.attention.base import ATTENTIONS, AttentionVariant
from lce.attention import full  # noqa: F401  (registers the variant)

__all__ = ["ATTENTIONS", "AttentionVariant"]
