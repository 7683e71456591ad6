"""Forward tile shapes chosen by timing on the GPU the first time a problem shape is seen (autotuning).

``@triton.autotune`` cannot be used directly: the tile lists (``schedule.py``) depend on the tile sizes, so each
candidate needs its own schedule. ``forward_config`` does what autotune does, with that: for a key (compute
capability, dtype, head-dim tile, segment count, modifiers, a power-of-two length bucket) it times every candidate
that fits the device with ``triton.testing.do_bench`` on the caller's inputs, once, and keeps the fastest for the
process. The candidates are FlashAttention-2's shapes for Hopper and Ampere (64 x 64 with 4 warps, 128 x 64 and
128 x 128 with 8 warps); ``python -m lce.kernels.inspect`` compiles each of them for sm_90 and sm_80, and the default
test holds them to the compile rules (no spill, shared memory within the limit, tensor cores).

Elsewhere (Triton's interpreter) and with ``LCE_AUTOTUNE=0`` the first candidate is used without timing. The choice is
recorded in ``chosen`` so benchmarks can report it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lce.kernels.attention.launch import head_dim_tile, launch_options, shared_class, tile_sizes


@dataclass(frozen=True)
class TileConfig:
    """One forward launch shape: query and key tile sizes, warps and pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def options(self) -> dict[str, int]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}, {self.num_warps} warps, {self.num_stages} stages"


#: ``(shared class, head-dim tile) -> extra candidates`` for bf16/fp16 beyond the launch table's 64 x 64 default (the
#: first candidate everywhere). Sized so that each fits the class's shared memory without spilling (compile check).
EXTRA_CANDIDATES: dict[tuple[str, int], tuple[TileConfig, ...]] = {
    ("227k", 64): (TileConfig(128, 64, 8, 3), TileConfig(128, 128, 8, 3)),
    ("227k", 128): (TileConfig(128, 64, 8, 3), TileConfig(128, 128, 8, 2)),
    ("163k", 64): (TileConfig(128, 64, 8, 3), TileConfig(128, 128, 8, 2)),
    ("163k", 128): (TileConfig(128, 64, 8, 2),),
}

#: key -> the chosen ``TileConfig`` (filled by ``forward_config``; read by benchmarks).
chosen: dict[tuple, TileConfig] = {}


def candidates(dtype: torch.dtype, head_dim: int, capability: tuple[int, int] | None, block_mask: bool = False,
               segments: int = 0) -> list[TileConfig]:
    """The forward shapes tried on a device: the launch table's 64 x 64 configuration first, then the larger tiles
    for bf16/fp16 (fp32 runs "ieee" products without tensor cores, where larger tiles only spill more; a per-pair
    block-mask gather needs more registers and shared memory than the larger tiles leave; with two or more segments
    the ownership test of a 128 x 128 tile spilled 64 B at head dim 128)."""
    base = launch_options("forward", dtype, head_dim, capability, block_mask=block_mask)
    first = TileConfig(*tile_sizes(64, torch.device("cuda"), dtype, head_dim), base["num_warps"], base["num_stages"])
    if dtype == torch.float32 or block_mask:
        return [first]
    extra = EXTRA_CANDIDATES.get((shared_class(capability), head_dim_tile(head_dim)), ())
    return [first, *(c for c in extra if segments < 2 or c.block_n < 128)]


def length_bucket(length: int) -> int:
    """Lengths within a factor of two share a choice (from 1024 up)."""
    return 1 << max(10, (max(length, 1) - 1).bit_length())


def autotuning() -> bool:
    return os.environ.get("LCE_AUTOTUNE", "1") != "0"


def forward_config(key: tuple, options: list[TileConfig], run: Callable[[TileConfig], object],
                   on_gpu: bool) -> TileConfig:
    """The fastest of ``options`` for ``key`` (timed once per process with ``run(config)`` on a GPU), else the
    first. ``run`` must launch the forward with that configuration and return when it is queued."""
    if key in chosen:
        return chosen[key]
    if not on_gpu or not autotuning() or len(options) == 1:
        return options[0]
    from triton.testing import do_bench

    times = {config: do_bench(lambda config=config: run(config), warmup=5, rep=20) for config in options}
    best = min(times, key=times.get)
    chosen[key] = best
    return best
