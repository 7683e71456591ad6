"""``flash_attention``: the public function, its input checks, and the autograd wrapper of the Triton kernels.

The ``ref`` backend runs ``attention_reference`` (plain PyTorch, autograd through it); ``triton`` runs the
FlashAttention-2 kernels (``triton_forward.py``, ``triton_backward.py``) over the tile lists of ``schedule.py``.
Backend choice: ``lce.kernels.backend.resolve_backend`` (explicit > ``use_backend`` > ``LCE_BACKEND`` > Triton on
CUDA, the reference elsewhere). Triton modules are imported on first use, so importing this module compiles and
launches nothing and works where Triton is not installed.
"""

from __future__ import annotations

import torch

from lce.errors import LceError
from lce.kernels.attention.launch import launch_options, tile_sizes
from lce.kernels.attention.reference import attention_reference
from lce.kernels.attention.spec import MAX_POSITION, AttentionSpec
from lce.kernels.backend import MAX_GRID_YZ, device_capability, resolve_backend

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = (*KERNEL_DTYPES, torch.float64)  # fp64 for exact checks on the reference only
MAX_HEAD_DIM = 256  # a query tile and its accumulators must fit in registers


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_inputs(q, k, v, spec, q_pos, k_pos, backend: str) -> None:
    """Clear errors for inputs the attention cannot take (named, with what is allowed)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("q_pos", q_pos), ("k_pos", k_pos)):
        if not isinstance(t, torch.Tensor):
            raise LceError(f"flash_attention: {name} must be a tensor, got {type(t).__name__}")
    if not isinstance(spec, AttentionSpec):
        raise LceError(f"flash_attention: spec must be an AttentionSpec, got {type(spec).__name__}")
    for name, t, layout in (("q", q, "[B, H, Tq, D]"), ("k", k, "[B, HKV, Tk, D]"), ("v", v, "[B, HKV, Tk, Dv]")):
        if t.dim() != 4:
            raise LceError(f"flash_attention: {name} must be 4-D {layout}, got {_shape(t)}")
    batch, heads, _, dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise LceError(f"flash_attention: batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if k.shape[:3] != v.shape[:3]:
        raise LceError(f"flash_attention: k {_shape(k)} and v {_shape(v)} must agree on [B, HKV, Tk]")
    if k.shape[3] != dim:
        raise LceError(f"flash_attention: q and k head dims differ: q {_shape(q)}, k {_shape(k)}")
    if k.shape[1] == 0 or heads % k.shape[1]:
        raise LceError(f"flash_attention: query heads H = {heads} must be a multiple of KV heads HKV = {k.shape[1]}")
    allowed = KERNEL_DTYPES if backend == "triton" else REFERENCE_DTYPES
    if q.dtype not in allowed or k.dtype != q.dtype or v.dtype != q.dtype:
        raise LceError(f"flash_attention ({backend}): q, k, v must share one dtype among "
                       f"{', '.join(str(d).removeprefix('torch.') for d in allowed)}; got {q.dtype}, {k.dtype}, "
                       f"{v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise LceError(f"flash_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    _check_positions(q, k, q_pos, k_pos)
    _check_spec_tensors(spec, q)
    if backend == "triton" and (dim > MAX_HEAD_DIM or v.shape[3] > MAX_HEAD_DIM):
        raise LceError(f"flash_attention (triton): head dims up to {MAX_HEAD_DIM} are supported, got D = {dim}, "
                       f"Dv = {v.shape[3]}; use backend 'ref'")
    if backend == "triton" and batch * heads > MAX_GRID_YZ:
        raise LceError(f"flash_attention (triton): B * H = {batch} * {heads} = {batch * heads} programs per query "
                       f"tile exceed CUDA's {MAX_GRID_YZ} on the launch grid's second axis; split the batch into "
                       "smaller calls or use backend 'ref'")


def _check_positions(q, k, q_pos, k_pos) -> None:
    for name, pos, length in (("q_pos", q_pos, q.shape[2]), ("k_pos", k_pos, k.shape[2])):
        expected = (q.shape[0], length)
        if tuple(pos.shape) != expected:
            raise LceError(f"flash_attention: {name} must be [B, {'Tq' if name == 'q_pos' else 'Tk'}] = "
                           f"{list(expected)}, got {_shape(pos)}")
        if pos.dtype.is_floating_point or pos.dtype == torch.bool or pos.is_complex():
            raise LceError(f"flash_attention: {name} must hold integer positions, got {pos.dtype}")
        if pos.device != q.device:
            raise LceError(f"flash_attention: {name} is on {pos.device}, q on {q.device}")
        # Checked where it is free (no device synchronisation): the kernels compute positions in int32.
        if pos.device.type == "cpu" and pos.numel() and int(pos.abs().max()) > MAX_POSITION:
            raise LceError(f"flash_attention: {name} must stay within +-2^30, got {int(pos.abs().max())}")


def _check_spec_tensors(spec: AttentionSpec, q: torch.Tensor) -> None:
    for name, t in spec.tensors.items():
        if t.device != q.device:
            raise LceError(f"flash_attention: spec.{name} is on {t.device}, q on {q.device}; move it with .to()")
    if spec.alibi_slopes is not None and spec.alibi_slopes.numel() != q.shape[1]:
        raise LceError(f"flash_attention: spec.alibi_slopes has {spec.alibi_slopes.numel()} slopes for "
                       f"H = {q.shape[1]} query heads")
    if spec.rotary is not None and spec.rotary.rotary_dim > q.shape[3]:
        raise LceError(f"flash_attention: the rotary dim R = {spec.rotary.rotary_dim} (2 * len(inv_freq)) exceeds "
                       f"the head dim D = {q.shape[3]}")


def decode_splits(n_qt: int, n_kt: int, programs: int, device: torch.device) -> int:
    """Key splits per query tile: > 1 only when one query tile faces several key tiles (decode), enough to give
    every streaming multiprocessor about two programs."""
    if n_qt > 1 or n_kt <= 1:
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(n_kt, -(-target // programs)))


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: the forward keeps the log-sum-exp and the tile lists for the backward kernels."""

    @staticmethod
    def forward(ctx, q, k, v, spec, q_pos, k_pos):
        from lce.kernels.attention.schedule import build_schedule
        from lce.kernels.attention.triton_forward import attention_forward

        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if any(ctx.needs_input_grad[:3]):  # refuse a backward that cannot launch before running the forward
            for kernel in ("backward_dq", "backward_dk_dv"):
                launch_options(kernel, q.dtype, max(q.shape[-1], v.shape[-1]), device_capability(q),
                               logn=spec.logn_length is not None)
        q_pos32, k_pos32 = q_pos.to(torch.int32).contiguous(), k_pos.to(torch.int32).contiguous()
        block_m, block_n = tile_sizes(q.shape[2], q.device, q.dtype, max(q.shape[-1], v.shape[-1]))
        schedule = build_schedule(spec, q_pos32, k_pos32, block_m, block_n)
        n_splits = decode_splits(schedule.kv_count.shape[1], schedule.kv_index.shape[2], q.shape[0] * q.shape[1],
                                 q.device)
        out, lse = attention_forward(q, k, v, spec, q_pos32, k_pos32, schedule, n_splits)
        ctx.save_for_backward(q, k, v, out, lse, q_pos32, k_pos32, schedule.kv_count, schedule.kv_index,
                              schedule.q_count, schedule.q_index)
        ctx.spec, ctx.blocks = spec, (block_m, block_n)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from lce.kernels.attention.schedule import TileSchedule
        from lce.kernels.attention.triton_backward import attention_backward

        q, k, v, out, lse, q_pos, k_pos, kv_count, kv_index, q_count, q_index = ctx.saved_tensors
        schedule = TileSchedule(*ctx.blocks, kv_count, kv_index, q_count, q_index)
        dq, dk, dv = attention_backward(grad_out.contiguous(), q, k, v, out, lse, ctx.spec, q_pos, k_pos, schedule)
        return dq, dk, dv, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, q_pos: torch.Tensor,
                    k_pos: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Causal softmax attention following ``spec`` (segments at remapped positions, ALiBi, log-n, window + sinks,
    block mask), in one pass (FlashAttention-2) on the Triton backend.

    Args:
        q: ``[B, H, Tq, D]`` queries, unrotated when ``spec.segments`` (else rotated or position-free).
        k: ``[B, HKV, Tk, D]`` keys (same rotation state as ``q``); ``H`` a multiple of ``HKV`` (GQA).
        v: ``[B, HKV, Tk, Dv]`` values.
        spec: what to compute (``lce.kernels.attention.spec.AttentionSpec``); its tensors on ``q``'s device.
        q_pos, k_pos: ``[B, Tq]``, ``[B, Tk]`` integer absolute positions (any order, gaps allowed; left-pad keys
            may be negative); the kernels compute them in int32 (within +-2^30).
        backend: ``ref``, ``triton``, ``auto`` or None (``lce.kernels.backend.resolve_backend``).

    Returns:
        ``[B, Tq, H, Dv]`` in ``q.dtype``; a query with no visible key gets 0 (and no NaN in any gradient).

    Raises:
        LceError: bad shapes, dtypes or devices (named in the message); ``triton`` unavailable.
    """
    choice = resolve_backend(backend, *(t for t in (q, k, v) if isinstance(t, torch.Tensor)))
    check_inputs(q, k, v, spec, q_pos, k_pos, choice)
    if choice == "ref" or 0 in (q.shape[0], q.shape[2], k.shape[2]):
        return attention_reference(q, k, v, spec, q_pos, k_pos)
    return FlashAttentionFunction.apply(q, k, v, spec, q_pos, k_pos)
