"""Rotary position embedding: reference (``reference.py``), Triton kernel (``triton_rope.py``), autograd function and
public op (``function.py``)."""

from lce.kernels.rope.function import apply_rope, rope
from lce.kernels.rope.reference import rope_cos_sin, rope_reference

__all__ = ["apply_rope", "rope", "rope_cos_sin", "rope_reference"]
