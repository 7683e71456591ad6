"""TransNormer's NormAttention: linear attention normalised by a norm instead of the denominator (Qin et al. 2022,
"The Devil in Linear Transformer", arXiv:2210.10340 §4; reference: OpenNLPLab/Transnormer, and the first author's
transnormer-v2-pytorch ``NormLinearAttention``).

The paper shows that the scaling ``1 / φ(q_i)ᵀ Σ_j φ(k_j)`` of feature-map linear attention makes gradients unbounded,
and drops it for a normalisation of the attention output (``O = XNorm(Q(KᵀV))``; causal: ``(φ(Q)φ(K)ᵀ ⊙ M) V``)::

    out_i = Norm( Σ_{j<=i} (φ(q_i)·φ(k_j)) v_j )

Choices, as config fields:

- ``norm``: ``rmsnorm`` or ``layernorm`` (the paper's XNorm is either). No gain or bias: they would be new parameters
  without pretrained values, and ``o_proj`` (linear, right after) absorbs a per-channel gain exactly.
- ``per_head``: normalise each head's output (the usual multi-head choice) or all heads of a token together (the
  reference code normalises the concatenated heads).
- ``feature_map``: ``elu_plus_one`` (default: positive, so implicit attention weights are positive as under the
  pretrained softmax), ``elu`` (the reference code's default ``act_fun``), ``relu`` or ``identity``.

Not included: the paper's DiagAttention (block-local softmax) in the lower layers, which ``attention.layers`` can
approximate by keeping the first layers full (``all_but_first:K``), and the reference's output gate ``u`` (a new
projection without pretrained weights). Forms, decoding, padding and RoPE: ``lce.attention.linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lce.attention.base import ATTENTIONS
from lce.attention.linear import FEATURE_MAPS, LinearAttention, head_norm, mask_keys
from lce.config import check


@ATTENTIONS.register("transnormer")
@dataclass(frozen=True)
class TransNormer(LinearAttention):
    """NormAttention.

    Attributes:
        feature_map: ``φ``: ``elu_plus_one``, ``elu``, ``relu`` or ``identity``.
        norm: ``rmsnorm`` or ``layernorm`` (without gain or bias).
        per_head: normalise each head (True) or the concatenated heads of a token (False).
        norm_eps: added to the variance.
    """

    name: str = "transnormer"
    feature_map: Literal["elu_plus_one", "elu", "relu", "identity"] = "elu_plus_one"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    per_head: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        check(self.feature_map in FEATURE_MAPS, "attention.feature_map",
              f"{self.feature_map!r} is not one of {', '.join(FEATURE_MAPS)}")
        check(self.norm in ("rmsnorm", "layernorm"), "attention.norm", f"{self.norm!r} is not rmsnorm or layernorm")
        check(self.norm_eps > 0, "attention.norm_eps", f"must be > 0, got {self.norm_eps}")

    def query_features(self, query, scaling, context):
        return FEATURE_MAPS[self.feature_map](query)

    def key_features(self, key, valid, scaling, context, carry):
        return mask_keys(FEATURE_MAPS[self.feature_map](key), valid), None, None

    def output(self, num, den):
        return head_norm(num, self.norm, self.norm_eps, self.per_head)
