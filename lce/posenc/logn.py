"""Log-n attention scaling (Chiang & Cholak 2022, arXiv:2202.12172; Qwen-1 ``use_logn_attn``; Su 2021).

Queries at position ``p`` (0-based) are multiplied by ``max(1, ln(p + 1) / ln(L))`` with ``L`` the training length,
so attention entropy stays near its training value as the number of attended keys grows past ``L``. Qwen-1 indexes
``log(i, L)`` by the 1-based position ``i = p + 1`` and Self-Extend's ``scale_base`` option uses
``clip(log(m + 1) / log(L), min=1)``: the same formula. Positions up to ``L - 1`` are unchanged, so the model is
exactly the unpatched one within its training length.

``posenc=logn`` is RoPE with log-n scaling; any other method composes with it through ``posenc.logn=true``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lce.config import check
from lce.posenc.base import POSENCS, PosEnc


def logn_scale(length: int):
    """The query multiplier as a function of positions ``[B, Tq] -> [B, Tq]`` (fp32)."""
    log_length = math.log(length)

    def scale(positions: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.log(positions.to(torch.float32) + 1) / log_length, min=1.0)

    return scale


def original_length(config) -> int:
    """The training length of a model: ``original_max_position_embeddings`` when a scaling method set it."""
    rope = getattr(config, "rope_parameters", None) or {}
    return int(rope.get("original_max_position_embeddings") or config.max_position_embeddings)


@POSENCS.register("logn")
@dataclass(frozen=True)
class LogN(PosEnc):
    """RoPE plus log-n query scaling (``logn_length`` defaults to the model's training length)."""

    name: str = "logn"
    logn: bool = True

    def __post_init__(self):
        super().__post_init__()
        check(self.logn, "posenc.logn", "posenc=logn with logn=false is plain RoPE: use posenc=rope")

    def apply(self, target) -> None:
        target.require_rotary("logn")
