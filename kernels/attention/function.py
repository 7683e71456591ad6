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
from lce.kernels.attention import tuning
from lce.kernels.attention.launch import backward_tiles, gqa_packing, head_dim_tile, launch_options, tile_sizes
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


def tuning_key(spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, head_dim: int) -> tuple:
    """What the forward's best tile shape depends on (``tuning.forward_config``)."""
    modifiers = (spec.alibi_slopes is not None, spec.logn_length is not None, spec.window is not None,
                 spec.block_mask is not None)
    return (device_capability(q), q.dtype, head_dim_tile(head_dim), len(spec.segments), modifiers,
            q.shape[1] // k.shape[1], tuning.length_bucket(k.shape[2]))


def forward_tiles(spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, head_dim: int,
                  run) -> tuple[tuning.TileConfig, bool]:
    """The forward's tile shape and whether GQA heads are packed: decode shapes and the interpreter use fixed tiles
    (``launch.tile_sizes``, ``launch.gqa_packing``), a GPU the fastest candidate for the problem's key (timed once;
    ``tuning.py``), ``run(config)`` launching the forward with a candidate."""
    tq, groups = q.shape[2], q.shape[1] // k.shape[1]
    packed_rows = gqa_packing(tq, groups, q.device)
    block_m, block_n = tile_sizes(tq, q.device, q.dtype, head_dim)
    capability = device_capability(q)
    if packed_rows is not None or not q.is_cuda or block_m < 64:
        options = launch_options("decode" if packed_rows or block_m < 64 else "forward", q.dtype, head_dim,
                                 capability, block_mask=spec.block_mask is not None)
        return tuning.TileConfig(packed_rows or block_m, block_n, **options), packed_rows is not None
    options = tuning.candidates(q.dtype, head_dim, capability, block_mask=spec.block_mask is not None,
                                segments=len(spec.segments))
    return tuning.forward_config(tuning_key(spec, q, k, head_dim), options, run, on_gpu=True), False


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: queries and keys rotated once per segment position map (``prerotate.py``), the tile lists
    shared by the layers of a forward (``schedule.cached_schedule``); the forward keeps the log-sum-exp and the
    unrotated inputs (the backward rotates them again rather than keeping one copy per map)."""

    @staticmethod
    def forward(ctx, q, k, v, spec, q_pos, k_pos):
        from lce.kernels.attention.prerotate import rotated_inputs
        from lce.kernels.attention.schedule import cached_schedule
        from lce.kernels.attention.triton_forward import attention_forward

        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        head_dim = max(q.shape[-1], v.shape[-1])
        capability = device_capability(q)
        needs_grad = any(ctx.needs_input_grad[:3])
        if needs_grad:  # refuse a backward that cannot launch before running the forward
            for kernel in ("backward_dq", "backward_dk_dv"):
                launch_options(kernel, q.dtype, head_dim, capability)
        q_pos32, k_pos32 = q_pos.to(torch.int32).contiguous(), k_pos.to(torch.int32).contiguous()
        q_rot, k_rot = rotated_inputs(q, k, spec, q_pos32, k_pos32)

        def run(config: tuning.TileConfig, pack_gqa: bool = False):
            schedule = cached_schedule(spec, q_pos, k_pos, config.block_m, config.block_n)
            n_qt, n_kt = schedule.kv_count.shape[2], schedule.kv_index.shape[3]
            programs = q.shape[0] * (k.shape[1] if pack_gqa else q.shape[1])
            n_splits = decode_splits(n_qt, n_kt, programs, q.device)
            return attention_forward(q_rot, k_rot, v, spec, q_pos32, k_pos32, schedule, n_splits, pack_gqa,
                                     options=config.options)

        config, pack_gqa = forward_tiles(spec, q, k, head_dim, run)
        out, lse = run(config, pack_gqa)
        # The backward kernels have their own tiles (``launch.backward_tiles``), hence their own tile lists, shared by
        # the layers too (cached on the positions): the dq kernel walks key lists, the dk/dv kernel query lists.
        tiles = backward_tiles(q.device, q.dtype, head_dim)
        lists = ()
        if needs_grad:
            dq_lists = cached_schedule(spec, q_pos, k_pos, *tiles["dq"])
            dk_dv_lists = cached_schedule(spec, q_pos, k_pos, *tiles["dk_dv"])
            lists = (dq_lists.kv_full, dq_lists.kv_count, dq_lists.kv_index, dk_dv_lists.q_count,
                     dk_dv_lists.q_index)
        ctx.save_for_backward(q, k, v, out, lse, q_pos32, k_pos32, *lists)
        ctx.spec, ctx.tiles = spec, tiles
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from lce.kernels.attention.prerotate import rotated_inputs, unrotated_gradient
        from lce.kernels.attention.schedule import TileSchedule
        from lce.kernels.attention.triton_backward import attention_backward
        from lce.kernels.attention.triton_common import distinct_maps

        q, k, v, out, lse, q_pos, k_pos, kv_full, kv_count, kv_index, q_count, q_index = ctx.saved_tensors
        spec = ctx.spec
        dq_lists = TileSchedule(*ctx.tiles["dq"], kv_full, kv_count, kv_index, None, None, None)
        dk_dv_lists = TileSchedule(*ctx.tiles["dk_dv"], None, None, None, None, q_count, q_index)
        q_rot, k_rot = rotated_inputs(q, k, spec, q_pos, k_pos)
        dq, dk, dv = attention_backward(grad_out.contiguous(), q_rot, k_rot, v, out, lse, spec, q_pos, k_pos,
                                        dq_lists, dk_dv_lists)
        if spec.segments:
            q_maps, k_maps, q_index, k_index = distinct_maps(spec.segments)
            dq = unrotated_gradient(dq, q_pos, q_maps, q_index, spec, q.dtype)
            dk = unrotated_gradient(dk, k_pos, k_maps, k_index, spec, k.dtype)
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
