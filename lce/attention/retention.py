"""Retention: multi-scale exponentially decaying linear attention, no softmax (Sun et al. 2023, "Retentive Network: A
Successor to Transformer for Large Language Models", arXiv:2307.08621; reference: microsoft/torchscale
``component/multiscale_retention.py`` and ``architecture/retnet.py``).

Per head ``h`` with decay ``γ_h`` (§2.1)::

    parallel (eq. 5):   Retention(X) = (Q Kᵀ ⊙ D) V,   D_nm = γ^(n-m) for n >= m, else 0
    recurrent (eq. 6):  S_n = γ S_{n-1} + K_nᵀ V_n,   Retention(X_n) = Q_n S_n
    chunkwise (eq. 7):  inside a chunk the parallel form, across chunks the recurrent state

then ``Y = GroupNorm_h(concat(heads))`` (§2.2, eq. 8). The decays (eq. 8, ``decay: arange``) are
``γ_h = 1 - 2^(-5-h)``, ``h = 0..H-1`` (H=4: 0.96875, 0.984375, 0.9921875, 0.99609375), computed in fp64 (heads past
~20 have ``1 - γ`` below fp32's resolution at 1). ``decay: linspace`` spreads ``1 - γ`` evenly in log space from
1/32 to 1/512 over the heads (``γ_h = 1 - 2^(-5-4h/(H-1))``), a common variant in community RetNet code, not the
paper's: with many heads none of them is left without decay.

q and k are the model's (after its rotary embedding): RetNet's ``Θ`` is an xPos-style rotation of q and k, and RoPE
is such a rotation, so ``Q Kᵀ ⊙ D`` is the paper's retention with the model's frequencies. The ``1/√d`` scaling is the
model's ``scaling`` on q (torchscale scales k; equal).

Normalisation choices (``norm``): ``groupnorm`` (the paper's GroupNorm with one group per head, i.e. LayerNorm over
each head's channels) or ``rmsnorm`` (what torchscale's code applies, ``RMSNorm(head_dim, elementwise_affine=False)``);
neither has a gain (``o_proj`` absorbs it; torchscale has none either). The paper's retention-score normalisations
(§2.2: ``D_nm / √(Σ_i D_ni)`` and ``R_nm / max(|Σ_i R_ni|, 1)``) only rescale each output row before that
scale-invariant norm, so they change nothing but the norm's ``eps`` and are not applied. Not included: the swish output
gate ``swish(X W_G)`` (a new projection without pretrained weights). Forms, decoding, padding:
``lce.attention.linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lce.attention.base import ATTENTIONS
from lce.attention.linear import LinearAttention, head_norm, mask_keys
from lce.config import check


def retention_log_decays(num_heads: int, decay: Literal["arange", "linspace"] = "arange") -> torch.Tensor:
    """``log γ_h`` for ``h = 0..H-1`` in fp64 (``γ_h = 1 - 2^(-e_h)``, ``e_h = 5 + h`` or ``5 + 4h/(H-1)``)."""
    h = torch.arange(num_heads, dtype=torch.float64)
    exponent = 5.0 + (h if decay == "arange" else 4.0 * h / max(num_heads - 1, 1))
    return torch.log1p(-torch.pow(2.0, -exponent))


@ATTENTIONS.register("retention")
@dataclass(frozen=True)
class Retention(LinearAttention):
    """Multi-scale retention from the model's q/k/v.

    Attributes:
        decay: per-head decays: ``arange`` (the paper's ``1 - 2^(-5-h)``) or ``linspace`` (``1 - γ`` from 1/32 to
            1/512, log-spaced).
        norm: ``groupnorm`` (the paper: LayerNorm per head) or ``rmsnorm`` (torchscale's code); without gain.
        norm_eps: added to the variance.
    """

    name: str = "retention"
    decay: Literal["arange", "linspace"] = "arange"
    norm: Literal["groupnorm", "rmsnorm"] = "groupnorm"
    norm_eps: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        check(self.decay in ("arange", "linspace"), "attention.decay", f"{self.decay!r} is not arange or linspace")
        check(self.norm in ("groupnorm", "rmsnorm"), "attention.norm", f"{self.norm!r} is not groupnorm or rmsnorm")
        check(self.norm_eps > 0, "attention.norm_eps", f"must be > 0, got {self.norm_eps}")

    def context(self, layer, query, module) -> torch.Tensor:
        key = ("log_gamma", query.shape[1], query.device, query.dtype)
        if key not in layer.memo:
            layer.memo[key] = retention_log_decays(query.shape[1], self.decay).to(query.device, query.dtype)
        return layer.memo[key]

    def query_features(self, query, scaling, log_gamma):
        return query * scaling

    def key_features(self, key, valid, scaling, log_gamma, carry):
        batch, heads, length, _ = key.shape
        return mask_keys(key, valid), log_gamma[None, :, None].expand(batch, heads, length), None

    def output(self, num, den):
        return head_norm(num, "layernorm" if self.norm == "groupnorm" else "rmsnorm", self.norm_eps)
