"""Position-aware flash attention (lce issue #5): one single-pass kernel for lce's long-context methods.

``flash_attention(q, k, v, spec, q_pos, k_pos)`` computes causal softmax attention whose logits follow an
``AttentionSpec``: RoPE segments at remapped positions (DCA, Self-Extend, ReRoPE, StreamingLLM sinks), ALiBi, log-n
query scaling, a sliding window with sinks, a block-sparse mask. Files: ``spec.py`` (the data; each method writes its
segments in its own ``lce.posenc`` module), ``reference.py`` (plain PyTorch), ``schedule.py`` (which key tiles each
query tile visits, per segment, full tiles first), ``prerotate.py`` (queries and keys rotated once per position map,
gradients turned back), ``triton_forward.py`` / ``triton_backward.py`` (the kernels), ``launch.py`` (tiles, warps and
stages per GPU; ``python -m lce.kernels.inspect`` compiles them for sm_90 without a GPU), ``tuning.py`` (the forward's
tile shape, timed on the GPU), ``function.py`` (autograd and the public function).

Importing this package compiles and launches nothing (Triton is imported when a Triton kernel first runs).
"""

from lce.deprecated import renamed
from lce.kernels.attention.function import flash_attention
from lce.kernels.attention.reference import attention_reference
from lce.kernels.attention.spec import IDENTITY, AttentionSpec, PairSelect, PositionMap, Segment
from lce.kernels.rope.rotation import Rotation

__all__ = ["IDENTITY", "AttentionSpec", "PairSelect", "PositionMap", "Rotation", "Segment", "attention_reference",
           "flash_attention"]


# The spec's former name of the one rotation type.
__getattr__ = renamed(__name__, {"Rotary": "lce.kernels.rope.Rotation"})
