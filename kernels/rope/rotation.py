"""The rotary embedding of one model (or one layer) as data: the one rotation type of lce.

RoPE (Su et al. 2021, arXiv:2104.09864, eq. 34): pair ``d`` of a head vector is turned by ``position * inv_freq[d]``.
Methods such as DCA, Self-Extend, ReRoPE and StreamingLLM rotate queries and keys at remapped positions inside
attention, so they need the rotation as a function of explicit positions rather than the model's precomputed
``(cos, sin)``; the position-aware attention kernel (``lce.kernels.attention``) reads the same fields.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from lce.errors import ConfigError
from lce.kernels.rope.function import rope
from lce.kernels.rope.reference import rope_cos_sin, rotate

#: (cos, sin) tables a ``Rotation`` keeps for ``apply_consecutive``: every layer of a forward rotates at the same
#: positions, so the tables are computed once per forward, not once per layer (each is ``T x R`` in the input dtype).
TABLES_KEPT = 8

RotaryStyle = Literal["half", "interleaved"]


@dataclass(frozen=True, eq=False)
class Rotation:
    """The rotary embedding of one model.

    Attributes:
        inv_freq: ``[R/2]`` fp32 inverse frequencies (after any frequency scaling); dims past ``R`` pass through
            unrotated (partial rotary). Empty: a layer that does not rotate (SmolLM3's NoPE layers).
        attention_scaling: cos and sin are multiplied by it (YaRN / LongRoPE temperature), rotated dims only.
        style: ``half`` pairs ``x[d]`` with ``x[d + R/2]`` (Llama's ``rotate_half``); ``interleaved`` pairs
            ``x[2d]`` with ``x[2d + 1]`` (GPT-J, Cohere).
    """

    inv_freq: torch.Tensor
    attention_scaling: float = 1.0
    style: RotaryStyle = "half"
    _tables: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.inv_freq, torch.Tensor) or self.inv_freq.dim() != 1:
            raise ConfigError(f"Rotation.inv_freq must be a 1-D tensor [R/2], got "
                              f"{getattr(self.inv_freq, 'shape', type(self.inv_freq).__name__)}")
        if not self.inv_freq.is_floating_point():
            raise ConfigError(f"Rotation.inv_freq must be a float tensor, got {self.inv_freq.dtype}")
        if not math.isfinite(self.attention_scaling):
            raise ConfigError(f"Rotation.attention_scaling must be finite, got {self.attention_scaling}")
        if self.style not in get_args(RotaryStyle):
            raise ConfigError(f"Rotation.style must be one of {', '.join(get_args(RotaryStyle))}, got {self.style!r}")

    @property
    def rotary_dim(self) -> int:
        """``R``: the rotated leading dims of each head (0: no rotation)."""
        return 2 * self.inv_freq.numel()

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [..., T]`` -> ``cos, sin [..., T, R]`` (computed in fp32, returned in ``dtype``)."""
        return rope_cos_sin(positions, self.inv_freq, self.attention_scaling, self.style, dtype)

    def apply(self, x: torch.Tensor, positions: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """Rotate ``x [B, H, T, D]`` at ``positions [B, T]`` (or ``[T]``); dims past ``rotary_dim`` pass through.

        Runs ``lce.kernels.rope.rope``: the reference (transformers' result bit for bit) by default on CPU, the fused
        Triton kernel on CUDA (see ``lce.kernels.backend``)."""
        return rope(x, positions, self.inv_freq, self.attention_scaling, self.style, backend)

    def apply_consecutive(self, x: torch.Tensor, position_map, start: int) -> torch.Tensor:
        """``apply(x, position_map(positions))`` for the consecutive positions ``start, start + 1, ...`` of
        ``x [B, H, T, D]`` (every batch row alike), on the reference path, bit for bit. ``position_map``: a hashable
        ``positions -> positions`` (``lce.kernels.attention.spec.PositionMap``). The cos/sin tables are kept per
        (map, start, length, dtype, device), so the layers of one forward share them."""
        length = x.shape[2]
        key = (position_map, start, length, x.dtype, x.device)
        if key not in self._tables:
            positions = position_map(torch.arange(start, start + length, device=x.device))
            self._tables[key] = self.cos_sin(positions, x.dtype)
            while len(self._tables) > TABLES_KEPT:
                self._tables.popitem(last=False)
        self._tables.move_to_end(key)
        return rotate(x, *self._tables[key], self.style)
