"""Rotary position embedding: reference (``reference.py``), Triton kernel (``triton_rope.py``), autograd function and
public op (``function.py``), and the rotation type every position-remapping method and kernel reads
(``rotation.py``)."""

from lce.kernels.rope.function import apply_rope, rope
from lce.kernels.rope.reference import rope_cos_sin, rope_reference
from lce.kernels.rope.rotation import Rotation

__all__ = ["Rotation", "apply_rope", "rope", "rope_cos_sin", "rope_reference"]
