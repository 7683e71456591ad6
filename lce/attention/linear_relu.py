"""Linear attention with ``φ(x) = relu(x)`` (the ReLU feature map studied with Katharopoulos et al.'s linear attention,
arXiv:2006.16236 §3.2; e.g. cosFormer, Qin et al. 2022, arXiv:2202.08791, uses it as its base feature map).

Same recurrence and normalisation as ``linear_elu``::

    out_i = φ(q_i)ᵀ Σ_{j<=i} φ(k_j) v_jᵀ / (φ(q_i)ᵀ Σ_{j<=i} φ(k_j) + eps)

ReLU features are non-negative but can all be zero: a query whose features miss every key's gets ``den = 0`` and
outputs 0 (``eps`` avoids the division by zero). ReLU is positively homogeneous, so the softmax scale would cancel in
the ratio anyway; none is applied. Forms, decoding, padding and RoPE: ``lce.attention.linear``.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lce.attention.base import ATTENTIONS
from lce.attention.linear import FeatureMapAttention


@ATTENTIONS.register("linear_relu")
@dataclass(frozen=True)
class LinearRelu(FeatureMapAttention):
    """Linear attention with ``φ(x) = relu(x)``."""

    name: str = "linear_relu"

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)
