"""Linear attention with ``φ(x) = elu(x) + 1`` (Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention", arXiv:2006.16236).

The softmax similarity ``exp(q·k/√d)`` is replaced by a feature-map similarity ``φ(q)·φ(k)`` (the paper's "kernel",
§3.2), which makes causal attention a recurrence with a ``D x D`` state per head (§3.3-3.4)::

    out_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + eps),   S_i = Σ_{j<=i} φ(k_j) v_jᵀ,   z_i = Σ_{j<=i} φ(k_j)

with ``φ(x) = elu(x) + 1`` (§3.2.1), positive, so every implicit attention weight is positive as under softmax. ``eps``
is the reference implementation's 1e-6 (fast-transformers ``CausalLinearAttention``). Forms, decoding, padding and
what RoPE means here: ``lce.attention.linear``.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lce.attention.base import ATTENTIONS
from lce.attention.linear import FeatureMapAttention


@ATTENTIONS.register("linear_elu")
@dataclass(frozen=True)
class LinearElu(FeatureMapAttention):
    """Katharopoulos et al.'s linear attention, ``φ(x) = elu(x) + 1``."""

    name: str = "linear_elu"

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1.0
