"""Rotary modules lce swaps into a model instance."""

from __future__ import annotations

import torch
from torch import nn


class NeutralRotary(nn.Module):
    """Returns ``cos = 1, sin = 0``: the model's ``apply_rotary_pos_emb`` becomes an exact identity.

    Used by methods that remove rotation (NoPE, ALiBi) or rotate inside attention instead (DCA, Self-Extend, ReRoPE).
    Keeps the replaced module's ``inv_freq`` (fp32, not persistent) so the rotary width and frequencies stay
    inspectable.
    """

    def __init__(self, replaced: nn.Module):
        super().__init__()
        self.inv_freq = nn.Buffer(replaced.inv_freq.detach().clone().float(), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, C]``, ``position_ids [B|1, T]`` -> ``cos, sin [B|1, T, rotary_dim]`` in ``x.dtype``."""
        shape = (*position_ids.shape, 2 * self.inv_freq.numel())
        return x.new_ones(shape), x.new_zeros(shape)
