"""How the attention kernels are launched on a GPU: tile sizes, warps and pipeline stages, in one place.

``function.py`` picks the tiles (``tile_sizes``), ``triton_forward.forward_launch`` and
``triton_backward.backward_launches`` take warps and stages from ``launch_options``, and ``lce.kernels.inspect``
compiles the same configurations ahead of time (``python -m lce.kernels.inspect``), so the compile check and the
launch cannot disagree.

Shared memory grows with the pipeline: every stage keeps one more key/value tile in flight. The configurations below
fit each target's per-block limit (figures from the compile check, ``experiments/results/kernels/compile/``); they
are static fits, not tuned on a GPU (issue #14 items 2 and 4).
"""

from __future__ import annotations

import torch

from lce.errors import LceError

#: Largest dynamic shared memory one block may use, by compute capability (CUDA programming guide, "Technical
#: specifications per compute capability"); devices not listed are taken as the smallest class (99 KB).
SHARED_PER_BLOCK = {(8, 0): 166_912, (8, 7): 166_912, (9, 0): 232_448, (10, 0): 232_448, (10, 3): 232_448}
SMALL_SHARED = 101_376

KERNELS = ("forward", "decode", "backward_dq", "backward_dk_dv")
DEFAULT_WARPS, DEFAULT_STAGES = 4, 3

#: ``(shared class, kernel, fp32?, head-dim tile) -> (num_warps, num_stages)`` where it differs from 4 warps and 3
#: stages. Classes: ``227k`` (sm_90, sm_100), ``163k`` (sm_80), ``99k`` (every other device). Head-dim tiles are the
#: kernels' power-of-two widths (``next_power_of_2(D)``, at least 16). The stage counts fit with ``tile_sizes``' tiles
#: (each stage keeps one more key/value or query/dO tile in flight; on sm_90 the bf16/fp16 ones are the largest that
#: fit, elsewhere they may be conservative); 8 warps for the dk/dv kernel (and the head-dim-256 forward and dq kernels)
#: halve the registers a thread holds, which removes their spills at head dim 128 on sm_90 (and the forward's at 256:
#: with 4 warps every segment method and log-n spilled 16-124 B there).
#: ``None``: no configuration fits (``launch_options`` refuses it).
LAUNCH_TABLE: dict[tuple[str, str, bool, int], tuple[int, int] | None] = {
    ("227k", "forward", False, 256): (8, 3),
    ("227k", "decode", False, 256): (4, 3),
    ("227k", "backward_dq", False, 256): (8, 2),
    ("227k", "backward_dk_dv", False, 256): (8, 2),
    ("227k", "forward", True, 256): (4, 1),
    ("227k", "backward_dq", True, 256): (4, 1),
    ("227k", "backward_dk_dv", True, 256): (4, 1),
    **{("227k", "backward_dk_dv", False, d): (8, 3) for d in (16, 32, 64, 128)},
    **{("163k", "backward_dk_dv", False, d): (8, 3) for d in (16, 32, 64, 128)},
    ("163k", "forward", False, 256): (4, 2),
    ("163k", "backward_dq", False, 256): (8, 1),
    ("163k", "backward_dk_dv", False, 256): (8, 1),
    ("163k", "forward", True, 128): (4, 2),
    ("163k", "backward_dq", True, 128): (4, 2),
    ("163k", "backward_dk_dv", True, 128): (4, 2),
    ("163k", "forward", True, 256): (4, 1),
    ("163k", "backward_dq", True, 256): (4, 1),
    ("163k", "backward_dk_dv", True, 256): (4, 1),
    ("99k", "forward", False, 128): (4, 2),
    ("99k", "backward_dq", False, 128): (4, 2),
    ("99k", "backward_dk_dv", False, 128): (8, 1),
    ("99k", "forward", False, 256): (4, 1),
    ("99k", "backward_dq", False, 256): None,
    ("99k", "backward_dk_dv", False, 256): None,
    ("99k", "backward_dq", True, 64): (4, 2),
    ("99k", "backward_dk_dv", True, 64): (4, 2),
    ("99k", "forward", True, 128): (4, 1),
    ("99k", "backward_dq", True, 128): None,
    ("99k", "backward_dk_dv", True, 128): None,
    ("99k", "forward", True, 256): (4, 1),
    ("99k", "backward_dq", True, 256): None,
    ("99k", "backward_dk_dv", True, 256): None,
}


def shared_class(capability: tuple[int, int] | None) -> str:
    """``227k``, ``163k`` or ``99k``: the per-block shared memory class of a device (None: the interpreter, which
    has no limit, is given the H100/H200 configuration)."""
    if capability is None:
        return "227k"
    limit = SHARED_PER_BLOCK.get(tuple(capability), SMALL_SHARED)
    return "227k" if limit >= 232_448 else "163k" if limit >= 166_912 else "99k"


def head_dim_tile(head_dim: int) -> int:
    """The kernels' tile width for a head dim: its next power of two, at least 16 (as ``next_power_of_2``)."""
    return max(16, 1 << (max(head_dim, 1) - 1).bit_length())


def tile_sizes(tq: int, device: torch.device, dtype: torch.dtype | None = None,
               head_dim: int = 0) -> tuple[int, int]:
    """``(block_m, block_n)`` of the forward on CUDA: 16-row query tiles for decode-sized inputs (flash-decoding
    splits the keys instead), 64 x 64 otherwise; at head dims above 128 32-key tiles (bf16/fp16: 64 x 64 spilled
    8-216 B with segments or modifiers on sm_90, 64 x 32 none; fp32: 32 x 32, as even one pipeline stage of 64 x 256
    fp32 tiles overflows an H100's shared memory in the backward kernels). In the interpreter 32 x 32: tiny test
    inputs still span several tiles, and each tile costs interpreter overhead per operation whatever its size (16 x 16
    tiles made the tests 4x slower)."""
    if device.type != "cuda":
        return 32, 32
    if head_dim_tile(head_dim) > 128:
        return (16 if tq <= 16 else 32 if dtype == torch.float32 else 64), 32
    return (16 if tq <= 16 else 64), 64


def backward_tiles(device: torch.device, dtype: torch.dtype | None = None,
                   head_dim: int = 0) -> dict[str, tuple[int, int]]:
    """``{"dq": (block_m, block_n), "dk_dv": (block_m, block_n)}``: the backward kernels' tiles. The dq kernel takes
    the forward's. The dk/dv kernel keeps fp32 accumulators of its key tile (dk, dv) and walks 32-row query tiles:
    with 64-row ones it spilled at head dim 128 with ALiBi, log-n or a window (16-32 B, sm_90, 8 warps), with 32 it
    needs 206-254 registers and none; at head dim 256 (bf16/fp16) 16-row query tiles against 64-key tiles (with 32
    rows it still spilled 8-72 B with ALiBi, a block mask or sinks). In the interpreter 32 x 32 throughout."""
    block_m, block_n = tile_sizes(64, device, dtype, head_dim)
    if device.type != "cuda":
        return {"dq": (block_m, block_n), "dk_dv": (block_m, block_n)}
    if dtype != torch.float32 and head_dim_tile(head_dim) > 128:
        return {"dq": (block_m, block_n), "dk_dv": (16, 64)}
    return {"dq": (block_m, block_n), "dk_dv": (min(32, block_m), block_n)}


def dk_dv_parts(head_dim: int) -> dict[str, int]:
    """The dk/dv kernel's launches as ``{name: PARTS}`` (bit 1: dk, bit 2: dv). At head dim 256 dk and dv run as two
    launches, each with one fp32 ``64 x 256`` accumulator: together (two accumulators, 128 registers a thread at 8
    warps, plus the key and value tiles the products keep in registers) they spilled 104-460 B on sm_90; apart they
    need 194-254 registers and no spill, for one more ``Q K^T`` product per tile (5 instead of 4)."""
    return {"dk": 1, "dv": 2} if head_dim_tile(head_dim) >= 256 else {"dk_dv": 3}


#: Largest packed query tile (rows = query heads of a KV group x query tokens) for decode, on CUDA and in the
#: interpreter.
PACKED_ROWS = {"cuda": 64, "interpreter": 32}


def gqa_packing(tq: int, groups: int, device: torch.device) -> int | None:
    """The query tile height when the ``groups`` query heads sharing a KV head are packed into one tile (decode:
    ``groups * tq`` rows fit one tile, so each key/value tile is read once per KV head instead of once per query
    head; FlashAttention-3's "pack GQA"), else None."""
    rows = groups * tq
    if groups == 1 or rows > PACKED_ROWS["cuda" if device.type == "cuda" else "interpreter"]:
        return None
    return max(16, 1 << (rows - 1).bit_length())


def launch_options(kernel: str, dtype: torch.dtype, head_dim: int, capability: tuple[int, int] | None,
                   block_mask: bool = False) -> dict[str, int]:
    """``{"num_warps", "num_stages"}`` of one attention kernel (``LAUNCH_TABLE``, else 4 warps and 3 stages).

    Args:
        kernel: one of ``KERNELS``.
        dtype: the inputs' dtype.
        head_dim: ``max(D, Dv)``.
        capability: the target's compute capability (``backend.device_capability``), None in the interpreter.
        block_mask: whether a block mask is gathered per pair: the forward's masked tiles then keep the gathered mask
            in shared memory too (bf16 head dim 256: 246,272 B at 3 stages), so at head dim 256 it runs with one
            stage fewer; and the gather's offsets take registers, so the bf16/fp16 decode kernel, and the forward
            and dq kernels up to head dim 128, run with 8 warps (at 4 they spilled 4-232 B).

    Raises:
        LceError: no configuration of this kernel fits the device's shared memory (one line: dtype, head dim, what
            is supported).
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; one of {', '.join(KERNELS)}")
    # Decode tiles (16-64 query rows) are no larger than the forward's: the forward's configuration fits them too,
    # where the table has no decode entry of its own.
    key = (shared_class(capability), kernel, dtype == torch.float32, head_dim_tile(head_dim))
    if kernel == "decode" and key not in LAUNCH_TABLE:
        key = (key[0], "forward", *key[2:])
    choice = LAUNCH_TABLE.get(key, (DEFAULT_WARPS, DEFAULT_STAGES))
    if choice is None:
        raise LceError(f"flash_attention (triton): the {kernel.replace('_', ' ')} kernel for "
                       f"{str(dtype).removeprefix('torch.')} at head dim {head_dim} needs more shared memory than "
                       f"this GPU (compute capability {capability[0]}.{capability[1]}) gives a block; supported here: "
                       f"bf16/fp16 up to head dim 256, fp32 up to 128; use bf16/fp16 or backend 'ref'")
    warps, stages = choice
    if block_mask and kernel in ("forward", "decode") and head_dim_tile(head_dim) >= 256:
        stages = max(1, stages - 1)
    if block_mask and dtype != torch.float32 and (
            kernel == "decode" or (kernel in ("forward", "backward_dq") and head_dim_tile(head_dim) <= 128)):
        warps = max(warps, 8)
    return {"num_warps": warps, "num_stages": stages}
