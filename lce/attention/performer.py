"""Performer / FAVOR+: softmax attention estimated with positive orthogonal random features (Choromanski et al. 2021,
"Rethinking Attention with Performers", arXiv:2009.14794; reference: google-research ``performer/fast_attention``).

The softmax similarity ``exp(x·y)`` is an expectation over Gaussian ``ω`` (Lemma 1, positive random features)::

    exp(x·y) = E_ω[ exp(ω·x - |x|²/2) exp(ω·y - |y|²/2) ],   ω ~ N(0, I_d)

so with ``m`` draws ``φ(x) = m^{-1/2} [exp(ω_r·x - |x|²/2)]_r`` gives ``φ(x)·φ(y) ≈ exp(x·y)``. Queries and keys are
multiplied by ``√scaling`` (``d^{-1/4}`` for the usual ``1/√d``) so that ``φ(q)·φ(k) ≈ exp(q·k·scaling)``, the
model's own softmax similarity (of RoPE-rotated q and k); the output ``num / den`` is the estimate of softmax
attention. The ``ω_r`` are orthogonal (§2.4): blocks of ``d`` rows of random orthogonal matrices (QR of Gaussian
ones, Haar-distributed), each row rescaled to the length of a Gaussian vector (chi-distributed), so each row is
marginally ``N(0, I_d)`` and the estimate stays unbiased with lower variance.

Redraw policy (``redraw``): ``fixed`` draws each layer's features once, from ``seed`` and the layer index
(reproducible: equal seeds give equal models); ``every_forward`` draws new features at every forward while the module
is training (from torch's global RNG, so activation checkpointing, which restores that RNG, recomputes the same
draw), and uses the fixed draw in evaluation and decoding.

Max-subtraction stabiliser: ``exp`` of the log-features overflows or underflows in fp32, so the reference subtracts
maxima before exponentiating (a query's own maximum over its features; for keys the maximum over all keys), which
cancels between numerator and denominator. The key maximum over all keys is not causal (a key's feature would depend
on later keys, and decoding would not reproduce the full forward), so lce subtracts the *running* maximum
``c_t = max_{j<=t, r} (ω_r·k_j - |k_j|²/2)`` (per head, detached): ``φ(k_j)`` is computed as ``exp(u_j - c_j)`` and the
change of reference ``exp(c_{t-1} - c_t)`` is applied to the running state as a decay, exactly like retention's
``γ`` (``a_t = c_{t-1} - c_t <= 0``). Every key seen by query ``i`` is thus scaled by the same ``exp(-c_i)``, which
cancels; the parallel, chunked and recurrent forms compute the same thing.

No epsilon: the reference adds ``numerical_stabilizer = 1e-6`` to every stabilised feature, which biases the estimate
wherever the true weights are small next to ``1e-6 * Σ_r φ(k)_r`` (peaked features: for unit-scale q, v and keys of
norm ~12, m = 32, the output moves by 0.06 absolute at d = 16, by 1.6 at norm ~50). Stabilised features are
non-negative, so ``den = 0`` only when every weight is 0, and then ``num = 0`` too: lce divides by ``den`` where it is
positive and outputs 0 elsewhere, exactly the estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from lce.attention.base import ATTENTIONS
from lce.attention.linear import LinearAttention, mask_keys
from lce.config import check


def default_num_features(head_dim: int) -> int:
    """``round(d ln d)``: the ``m = Θ(d log d)`` of the paper's analysis (performer-pytorch's default)."""
    return max(1, round(head_dim * math.log(head_dim)))


def orthogonal_features(num_features: int, dim: int, generator: torch.Generator | None = None,
                        device: torch.device | None = None) -> torch.Tensor:
    """``[m, d]`` orthogonal random features: blocks of ``d`` orthonormal rows, each row scaled to a chi(d) length.

    The blocks are the Q of QR decompositions of Gaussian matrices with the signs fixed so that ``diag(R) > 0``
    (Mezzadri 2007, "How to generate random matrices from the classical compact groups"): LAPACK's Q alone is not
    Haar-distributed, its rows are biased (mean row ~0.05 instead of 0 at d = 16), and so is the softmax estimate, by
    ~3% at any ``m`` in ``test_performer.py`` (the reference implementations take Q as it comes).

    Args:
        generator: a seeded CPU generator (the fixed draw), or None for torch's global RNG on ``device``.
    """
    gaussian = torch.randn(-(-num_features // dim), dim, dim, generator=generator, device=device, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]  # Haar-distributed only with diag(R) > 0
    rows = q.transpose(-1, -2).reshape(-1, dim)[:num_features]
    lengths = torch.randn(num_features, dim, generator=generator, device=device, dtype=torch.float64).norm(dim=1)
    return (rows * lengths[:, None]).float()


def layer_seed(seed: int, layer_index: int) -> int:
    """The generator seed of a layer's fixed draw (distinct layers get distinct draws)."""
    return seed * 1_000_003 + layer_index


def log_features(x: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """``ω_r·x - |x|²/2``: ``[..., d] -> [..., m]``."""
    return x @ omega.T - x.pow(2).sum(-1, keepdim=True) / 2


@ATTENTIONS.register("performer")
@dataclass(frozen=True)
class Performer(LinearAttention):
    """FAVOR+ causal attention.

    Attributes:
        num_features: random features ``m`` per layer; None: ``round(d ln d)`` for head dim ``d``.
        redraw: ``fixed`` (drawn once per layer from ``seed``) or ``every_forward`` (redrawn at every training
            forward; the fixed draw in evaluation).
        seed: seed of the fixed draws.
    """

    name: str = "performer"
    num_features: int | None = None
    redraw: Literal["fixed", "every_forward"] = "fixed"
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check(self.num_features is None or (isinstance(self.num_features, int) and self.num_features >= 1),
              "attention.num_features", f"must be an integer >= 1 (or null for d ln d), got {self.num_features!r}")
        check(self.redraw in ("fixed", "every_forward"), "attention.redraw",
              f"{self.redraw!r} is not one of fixed, every_forward")
        check(isinstance(self.seed, int) and self.seed >= 0, "attention.seed", f"must be >= 0, got {self.seed!r}")

    def context(self, layer, query, module) -> torch.Tensor:
        dim = query.shape[-1]
        m = self.num_features or default_num_features(dim)
        if self.redraw == "every_forward" and module.training:
            return orthogonal_features(m, dim, device=query.device).to(query.dtype)
        key = ("omega", m, dim, query.device, query.dtype)
        if key not in layer.memo:
            generator = torch.Generator().manual_seed(layer_seed(self.seed, layer.layer_index))
            layer.memo[key] = orthogonal_features(m, dim, generator).to(query.device, query.dtype)
        return layer.memo[key]

    def query_features(self, query, scaling, omega):
        w = log_features(query * math.sqrt(scaling), omega)
        # A per-query shift cancels between numerator and denominator.
        return (w - w.detach().amax(-1, keepdim=True)).exp() / math.sqrt(omega.shape[0])

    def key_features(self, key, valid, scaling, omega, carry):
        u = log_features(key * math.sqrt(scaling), omega)  # [B, H, T, m]
        own = u.detach().amax(-1)  # [B, H, T]
        top = own if valid is None else own.masked_fill(~valid[:, None], float("-inf"))
        before_all = carry if carry is not None else top.new_full(top.shape[:2], float("-inf"))
        running = torch.maximum(top.cummax(-1).values, before_all[..., None])  # c_t
        before = torch.cat([before_all[..., None], running[..., :-1]], dim=-1)  # c_{t-1}
        # Nothing seen yet (-inf): the state is empty, any decay will do.
        log_decay = torch.where(torch.isfinite(before), before - running, torch.zeros_like(running))
        # Invisible keys are zeroed below; shifting them by their own maximum keeps exp (and its gradient) finite.
        reference = running if valid is None else torch.where(valid[:, None], running, own)
        fk = (u - reference[..., None]).exp() / math.sqrt(omega.shape[0])
        return mask_keys(fk, valid), log_decay, running[..., -1]

    def output(self, num, den):
        return num / torch.where(den > 0, den, torch.ones_like(den))[..., None]
