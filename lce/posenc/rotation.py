"""Rotary position embedding applied at arbitrary positions (for methods that rotate inside attention).

RoPE (Su et al. 2021, arXiv:2104.09864, eq. 34): pair ``i`` of a head vector is rotated by ``pos * inv_freq[i]``; the
formula and the fused kernel live in ``lce.kernels.rope``.
Methods such as DCA, Self-Extend, ReRoPE and StreamingLLM rotate queries and keys at remapped positions, so they need
the rotation as a function of explicit positions rather than the model's precomputed ``(cos, sin)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lce.kernels.rope import rope, rope_cos_sin


@dataclass(frozen=True)
class Rotation:
    """The rotary embedding of one model.

    Attributes:
        inv_freq: ``[R/2]`` fp32 inverse frequencies (after any frequency scaling).
        attention_scaling: the factor transformers multiplies cos and sin by (YaRN / LongRoPE temperature).
        style: ``half`` pairs ``x[i]`` with ``x[i + R/2]`` (Llama's ``rotate_half``); ``interleaved`` pairs
            ``x[2i]`` with ``x[2i + 1]`` (GPT-J, Cohere).
        rotary_dim: ``R``, the rotated leading part of each head (``< head_dim`` under partial rotary).
    """

    inv_freq: torch.Tensor
    attention_scaling: float = 1.0
    style: Literal["half", "interleaved"] = "half"

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [..., T]`` -> ``cos, sin [..., T, R]`` (computed in fp32, returned in ``dtype``)."""
        return rope_cos_sin(positions, self.inv_freq, self.attention_scaling, self.style, dtype)

    def apply(self, x: torch.Tensor, positions: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """Rotate ``x [B, H, T, D]`` at ``positions [B, T]`` (or ``[T]``); dims past ``rotary_dim`` pass through.

        Runs ``lce.kernels.rope.rope``: the reference (transformers' result bit for bit) by default on CPU, the fused
        Triton kernel on CUDA (see ``lce.kernels.backend``)."""
        return rope(x, positions, self.inv_freq, self.attention_scaling, self.style, backend)
