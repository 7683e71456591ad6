"""What ``lce.kernels.attention`` computes, as data: both the reference and the Triton kernels read it.

A spec is plain integers, floats and tensors (no callables), so a kernel can evaluate every rule in registers:

- ``PositionMap``: the position a query or key is rotated at, ``p -> where(r < below, min(mul * r + add, cap),
  otherwise)`` with ``r = (p // div) % mod`` (floor division and modulo, as Python and ``torch.remainder``);
- ``PairSelect``: which causal pairs a segment owns, ``lo <= i // div - j // div < hi`` and ``j < key_below``;
- ``Segment``: a pair it selects has logit ``R(q_map(i)) q_i . R(k_map(j)) k_j`` (``R`` the RoPE rotation of
  ``lce.kernels.rope.Rotation``; Su et al., arXiv:2104.09864, eq. 34). Each position-remapping method writes its
  segments once, in its own module (``lce.posenc.dca``, ``self_extend``, ``rerope``, ``sinks``), and the reference,
  the fused CPU path (``lce.core.staircase``) and the Triton kernel all read them;
- ``AttentionSpec``: the softmax scale, the segments and their rotary embedding, and the modifiers every method
  combines with (ALiBi slopes, log-n query scaling, a sliding window with sink tokens, a block-sparse mask).

Semantics (all combine): a pair ``(i, j)`` of absolute positions is visible iff ``j <= i`` (causal), the window and
block mask allow it, and, when segments exist, some segment selects it (if several do, the last one listed wins, as
in ``lce.core.segments.segmented_attention``). A query with no visible key outputs 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lce.errors import ConfigError
from lce.kernels.rope.rotation import Rotation

#: Largest absolute position (and map parameter) the kernels accept: they compute positions in int32.
MAX_POSITION = 2**30


def _floor_div(x: torch.Tensor, divisor: int) -> torch.Tensor:
    return torch.div(x, divisor, rounding_mode="floor")


def _check_int(value, where: str, minimum: int | None = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where} must be an integer{' or None' if optional else ''}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where} must be >= {minimum}, got {value}")
    if abs(value) > MAX_POSITION:
        raise ConfigError(f"{where} must be within +-2^30 (the kernels compute positions in int32), got {value}")


@dataclass(frozen=True)
class PositionMap:
    """``p -> where(r < below, min(mul * r + add, cap), otherwise)`` with ``r = (p // div) % mod``.

    Floor division and modulo as in Python and ``torch.remainder`` (so negative positions of left-pad keys map
    like any other); ``mod`` None = no modulo, ``cap`` None = no cap, ``below`` None = no threshold.
    """

    div: int = 1
    mod: int | None = None
    mul: int = 1
    add: int = 0
    cap: int | None = None
    below: int | None = None
    otherwise: int = 0

    def __post_init__(self):
        _check_int(self.div, "PositionMap.div", minimum=1)
        _check_int(self.mod, "PositionMap.mod", minimum=1, optional=True)
        for name in ("mul", "add", "otherwise"):
            _check_int(getattr(self, name), f"PositionMap.{name}")
        for name in ("cap", "below"):
            _check_int(getattr(self, name), f"PositionMap.{name}", optional=True)

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        """Mapped positions, same shape and dtype as the integer ``positions``."""
        r = _floor_div(positions, self.div) if self.div != 1 else positions
        if self.mod is not None:
            r = torch.remainder(r, self.mod)
        out = self.mul * r + self.add
        if self.cap is not None:
            out = out.clamp(max=self.cap)
        if self.below is not None:
            out = torch.where(r < self.below, out, torch.full_like(out, self.otherwise))
        return out

    @classmethod
    def constant(cls, value: int) -> PositionMap:
        """Every position maps to ``value``."""
        return cls(mul=0, add=value)


IDENTITY = PositionMap()


@dataclass(frozen=True)
class PairSelect:
    """``(i, j) -> lo <= i // div - j // div < hi`` and ``j < key_below`` (None bounds are open)."""

    div: int = 1
    lo: int | None = None
    hi: int | None = None
    key_below: int | None = None

    def __post_init__(self):
        _check_int(self.div, "PairSelect.div", minimum=1)
        for name in ("lo", "hi", "key_below"):
            _check_int(getattr(self, name), f"PairSelect.{name}", optional=True)
        if self.lo is not None and self.hi is not None and self.hi <= self.lo:
            raise ConfigError(f"PairSelect selects nothing: hi = {self.hi} must be > lo = {self.lo}")

    def __call__(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """bool, broadcasting ``i`` (query positions) against ``j`` (key positions)."""
        gap = _floor_div(i, self.div) - _floor_div(j, self.div) if self.div != 1 else i - j
        ok = torch.ones_like(gap, dtype=torch.bool)
        if self.lo is not None:
            ok = ok & (gap >= self.lo)
        if self.hi is not None:
            ok = ok & (gap < self.hi)
        if self.key_below is not None:
            ok = ok & (j < self.key_below)
        return ok


@dataclass(frozen=True)
class Segment:
    """A pair selected by ``select`` has logit ``R(q_map(i)) q_i . R(k_map(j)) k_j`` (``R`` = RoPE rotation)."""

    q_map: PositionMap
    k_map: PositionMap
    select: PairSelect


@dataclass(frozen=True, eq=False)
class AttentionSpec:
    """Everything besides q, k, v and positions that the attention computes.

    Attributes:
        scale: the softmax scale (``1/sqrt(D)`` usually).
        segments: position-remapped segments; empty: q and k arrive already rotated (or unrotated, e.g. NoPE/ALiBi).
        rotary: the RoPE the segments rotate with; required iff ``segments``.
        alibi_slopes: ``[H]`` fp32 ALiBi slopes: ``logit -= m_h * (i - j)`` (arXiv:2108.12409 §3), or None.
        logn_length: ``L``: queries are multiplied by ``max(1, ln(i + 1) / ln(L))`` (arXiv:2202.12172), or None.
        window: a pair is visible iff ``i - j < window`` or ``0 <= j < sink_tokens``; None = no window.
        sink_tokens: leading positions every query sees through the window (StreamingLLM sinks, arXiv:2309.17453).
        block_mask: ``[nQB, nKB]`` bool over absolute positions: a pair is visible iff
            ``block_mask[i // block_size, j // block_size]``; pairs whose blocks fall outside the mask (negative
            positions of left-pad keys, positions past the mask) are hidden. None = no block mask.
        block_size: positions per block of ``block_mask``.
    """

    scale: float
    segments: tuple[Segment, ...] = ()
    rotary: Rotation | None = None
    alibi_slopes: torch.Tensor | None = None
    logn_length: int | None = None
    window: int | None = None
    sink_tokens: int = 0
    block_mask: torch.Tensor | None = None
    block_size: int | None = None

    def __post_init__(self):
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not (
                math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"AttentionSpec.scale must be a finite number > 0, got {self.scale!r}")
        if not isinstance(self.segments, tuple) or not all(isinstance(s, Segment) for s in self.segments):
            raise ConfigError(f"AttentionSpec.segments must be a tuple of Segment, got {self.segments!r}")
        if self.segments and self.rotary is None:
            raise ConfigError("AttentionSpec.segments rotate queries and keys: pass rotary=Rotation(inv_freq, ...)")
        if self.rotary is not None and not self.segments:
            raise ConfigError("AttentionSpec.rotary is only used by segments; without segments q and k arrive "
                              "rotated: pass segments=(Segment(IDENTITY, IDENTITY, PairSelect()),) to rotate at "
                              "the true positions, or drop rotary")
        if self.rotary is not None and not isinstance(self.rotary, Rotation):
            raise ConfigError(f"AttentionSpec.rotary must be a Rotation, got {type(self.rotary).__name__}")
        if self.rotary is not None and self.rotary.rotary_dim == 0:
            raise ConfigError("AttentionSpec.rotary rotates nothing (empty inv_freq): without rotation every "
                              "segment scores alike; pass no segments (and no rotary)")
        if self.alibi_slopes is not None and (not isinstance(self.alibi_slopes, torch.Tensor)
                                              or self.alibi_slopes.dim() != 1
                                              or not self.alibi_slopes.is_floating_point()):
            raise ConfigError(f"AttentionSpec.alibi_slopes must be a 1-D float tensor [H], got "
                              f"{getattr(self.alibi_slopes, 'shape', self.alibi_slopes)!r}")
        _check_int(self.logn_length, "AttentionSpec.logn_length", minimum=2, optional=True)
        _check_int(self.window, "AttentionSpec.window", minimum=1, optional=True)
        _check_int(self.sink_tokens, "AttentionSpec.sink_tokens", minimum=0)
        if self.sink_tokens and self.window is None:
            raise ConfigError(f"AttentionSpec.sink_tokens = {self.sink_tokens} needs a window (sinks are the keys "
                              "a query sees outside its window)")
        self._check_block_mask()

    def _check_block_mask(self) -> None:
        if (self.block_mask is None) != (self.block_size is None):
            raise ConfigError("AttentionSpec.block_mask and block_size go together: got block_mask "
                              f"{'None' if self.block_mask is None else 'set'} and block_size={self.block_size}")
        if self.block_mask is None:
            return
        _check_int(self.block_size, "AttentionSpec.block_size", minimum=1)
        if not isinstance(self.block_mask, torch.Tensor) or self.block_mask.dtype != torch.bool or (
                self.block_mask.dim() != 2):
            raise ConfigError(f"AttentionSpec.block_mask must be a 2-D bool tensor [nQB, nKB], got "
                              f"{getattr(self.block_mask, 'dtype', type(self.block_mask).__name__)} "
                              f"{tuple(getattr(self.block_mask, 'shape', ()))}")

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The spec's tensors by field name (for device checks)."""
        named = {"alibi_slopes": self.alibi_slopes, "block_mask": self.block_mask,
                 "rotary.inv_freq": self.rotary.inv_freq if self.rotary is not None else None}
        return {name: t for name, t in named.items() if t is not None}
