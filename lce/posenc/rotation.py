"""Rotary position embedding applied at arbitrary positions (for methods that rotate inside attention).

RoPE (Su et al. 2021, arXiv:2104.09864, eq. 34): pair ``i`` of a head vector is rotated by ``pos * inv_freq[i]``.
Methods such as DCA, Self-Extend, ReRoPE and StreamingLLM rotate queries and keys at remapped positions, so they need
the rotation as a function of explicit positions rather than the model's precomputed ``(cos, sin)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


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
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device, torch.float32)
        if self.style == "half":
            angles = torch.cat((angles, angles), dim=-1)
        else:
            angles = torch.repeat_interleave(angles, 2, dim=-1)
        return (angles.cos() * self.attention_scaling).to(dtype), (angles.sin() * self.attention_scaling).to(dtype)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [B, H, T, D]`` at ``positions [B, T]`` (or ``[T]``); dims past ``rotary_dim`` pass through."""
        cos, sin = self.cos_sin(positions, x.dtype)
        if cos.dim() == 3:  # [B, T, R] -> [B, 1, T, R] to broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        r = self.rotary_dim
        rot, rest = x[..., :r], x[..., r:]
        if self.style == "half":
            half = r // 2
            turned = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        else:
            turned = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
        out = rot * cos + turned * sin
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out
