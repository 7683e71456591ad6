"""A causal LM's logit head as data: ``z = softcap * tanh(multiplier * (h W^T + b) / softcap)``.

The fused cross-entropy kernels need the head's parameters, not a callable: they recompute logits tile by tile and
never hold ``[N, V]`` of them. ``lce.hf.adapters.Adapter.logit_head`` builds one from a model; families differ only
in the multiplier (Cohere ``logit_scale``, Granite ``1 / logits_scaling``) and the final soft-cap (Gemma2/3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from lce.errors import LceError


@dataclass(frozen=True, eq=False)
class LogitHead:
    """The output layer of a causal LM and what the family does to its logits.

    Attributes:
        weight: ``[V, C]`` output embedding (the model's parameter itself, so gradients reach it).
        bias: ``[V]`` or None.
        multiplier: logits are multiplied by it before the soft-cap (1.0 for most families).
        softcap: ``c`` of the final soft-cap ``c * tanh(z / c)``, or None for none.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    multiplier: float = 1.0
    softcap: float | None = None

    def __post_init__(self):
        if self.weight.dim() != 2 or not self.weight.is_floating_point():
            raise LceError(f"LogitHead.weight must be a floating [V, C] tensor, got {self.weight.dtype} "
                           f"{tuple(self.weight.shape)}")
        if self.bias is not None and self.bias.shape != self.weight.shape[:1]:
            raise LceError(f"LogitHead.bias must be [V] = [{self.weight.shape[0]}] like the weight's rows, got "
                           f"{tuple(self.bias.shape)}")
        if not math.isfinite(self.multiplier):
            raise LceError(f"LogitHead.multiplier must be a finite number, got {self.multiplier}")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise LceError(f"LogitHead.softcap must be a positive finite number or None, got {self.softcap}")

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def to(self, dtype: torch.dtype) -> LogitHead:
        """The same head with weight and bias cast to ``dtype`` (differentiable, as autocast casts)."""
        bias = None if self.bias is None else self.bias.to(dtype)
        return replace(self, weight=self.weight.to(dtype), bias=bias)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., C] -> [..., V]`` in the head's dtype, with the same operations in the same order as the
        families' forwards (so a family whose multiplier is a power of two, or 1, gets bit-identical logits)."""
        logits = F.linear(hidden, self.weight, self.bias)
        if self.multiplier != 1.0:
            logits = logits * self.multiplier
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
