"""The public chunked linear attention op: checks its inputs, resolves the backend, runs the PyTorch chunkwise form
(``ref``) or the Triton kernels (``triton``, autograd through ``ChunkedLinearAttentionFunction``).

On Triton the normaliser ``den`` and the key sum ``z`` are computed beside ``num`` and ``S`` (``triton_chunk``: row
sums of the decayed causal scores plus ``φ(q)·z``), not as an extra value channel of ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lce.errors import LceError
from lce.kernels.backend import MAX_GRID_YZ, requested_backend, resolve_backend
from lce.kernels.linear_attention.reference import State, linear_attention_chunked_ref

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: The Triton kernels' chunk is a block size (results do not depend on it) within these bounds: ``tl.dot`` needs
#: tiles of at least 16 rows, and past 64 the fp32 ``[C, C]`` score accumulators outgrow the registers (compiled for
#: sm_90 in bf16 at ``C = 128``: 908-1192 B of spills at 4 warps, still 32 B in the dq/dk kernel at 8 warps; at 64
#: none, ``triton_chunk.LAUNCH_OPTIONS``). flash-linear-attention's chunk kernels use 64 too.
MIN_TRITON_CHUNK, MAX_TRITON_CHUNK = 16, 64


def triton_chunk(chunk_size: int) -> int:
    """The chunk the Triton kernels run with for ``chunk_size``: its next power of two, clamped to
    ``[MIN_TRITON_CHUNK, MAX_TRITON_CHUNK]``."""
    return min(MAX_TRITON_CHUNK, max(MIN_TRITON_CHUNK, 1 << (chunk_size - 1).bit_length()))


def chunk_cumsum(log_decay: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[B, H, T]`` -> ``[B, H, T]`` fp32: log-decays cumulated from the start of each chunk of ``chunk_size``."""
    batch, heads, length = log_decay.shape
    chunks = -(-length // chunk_size)
    padded = F.pad(log_decay.float(), (0, chunks * chunk_size - length))
    return padded.reshape(batch, heads, chunks, chunk_size).cumsum(-1).reshape(batch, heads, -1)[..., :length]


class ChunkedLinearAttentionFunction(torch.autograd.Function):
    """The Triton forward and backward. The log-decay gradient is computed in PyTorch from the kernels' ``dq``, ``dk``:
    with ``B_t = a_0 + ... + a_t``, the outputs depend on ``B`` only through ``q_i e^{B_i}``, ``k_j e^{-B_j}`` and the
    final state's factor ``e^{B_{T-1}}``, so exactly ``dL/dB_t = q_t·dq_t - k_t·dk_t (+ <dS_T, S_T> + <dz_T, z_T>
    at t = T-1)`` and ``dL/da_t = Σ_{i>=t} dL/dB_i`` (flash-linear-attention's ``chunk_simple_gla`` backward uses the
    same identity)."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, S0, z0, chunk_size):
        from lce.kernels.linear_attention.triton_chunk import chunk_forward

        b = None if log_decay is None else chunk_cumsum(log_decay, chunk_size).contiguous()
        out, den, S, z = chunk_forward(q, k, v, b, S0, z0, chunk_size)
        ctx.save_for_backward(q, k, v, b, S0, z0, S, z)
        ctx.chunk_size = chunk_size
        return out, den, S.to(v.dtype), z.to(v.dtype)

    @staticmethod
    def backward(ctx, d_out, d_den, d_S, d_z):
        from lce.kernels.linear_attention.triton_chunk import chunk_backward

        q, k, v, b, S0, z0, S, z = ctx.saved_tensors
        d_S, d_z = d_S.float().contiguous(), d_z.float().contiguous()
        dq, dk, dv, dS0, dz0 = chunk_backward(q, k, v, b, S0, z0, d_out.to(v.dtype).contiguous(),
                                              d_den.contiguous(), d_S, d_z, ctx.chunk_size)
        d_log_decay = None
        if b is not None and ctx.needs_input_grad[3]:
            d_sums = (q.float() * dq).sum(-1) - (k.float() * dk).sum(-1)
            d_sums[..., -1] += (d_S * S).sum((-2, -1)) + (d_z * z).sum(-1)
            d_log_decay = d_sums.flip(-1).cumsum(-1).flip(-1).to(b.dtype)
        return (dq.to(q.dtype), dk.to(k.dtype), dv, d_log_decay, None if S0 is None else dS0.to(S0.dtype),
                None if z0 is None else dz0.to(z0.dtype), None)


def _shape(name: str, x: torch.Tensor, expected: tuple, spelled: str) -> None:
    if tuple(x.shape) != expected:
        raise LceError(f"linear_attention: {name} must be {spelled} = {list(expected)}, got {list(x.shape)}")


def _check(fq, fk, v, log_decay, initial_state, chunk_size) -> None:
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise LceError(f"linear_attention: chunk_size must be an integer >= 1, got {chunk_size!r}")
    if fk.dim() != 4 or v.dim() != 4:
        raise LceError(f"linear_attention: fk [B, H, T, F] and v [B, H, T, E] must be 4-D, got {list(fk.shape)} and "
                       f"{list(v.shape)}")
    batch, heads, length, features = fk.shape
    channels = v.shape[-1]
    _shape("v", v, (batch, heads, length, channels), "[B, H, T, E]")
    named = {"fk": fk, "v": v}
    if fq is not None:
        _shape("fq", fq, tuple(fk.shape), "[B, H, T, F] like fk")
        named["fq"] = fq
    if log_decay is not None:
        _shape("log_decay", log_decay, (batch, heads, length), "[B, H, T]")
        named["log_decay"] = log_decay
    if initial_state is not None:
        S0, z0 = initial_state
        _shape("initial_state S", S0, (batch, heads, features, channels), "[B, H, F, E]")
        _shape("initial_state z", z0, (batch, heads, features), "[B, H, F]")
        named.update({"initial_state S": S0, "initial_state z": z0})
    for name, x in named.items():
        if not x.is_floating_point():
            raise LceError(f"linear_attention: {name} must be floating-point, got {x.dtype}")
        if x.dtype != fk.dtype or x.device != fk.device:
            raise LceError(f"linear_attention: {name} is {x.dtype} on {x.device}, fk {fk.dtype} on {fk.device}; "
                           "all inputs must share dtype and device")


def _check_grid(fk: torch.Tensor, chunk: int) -> None:
    """The Triton launches put the chunks and ``B * H`` on the grid's second and third axes (at most 65535 on CUDA)."""
    batch, heads, length = fk.shape[:3]
    chunks = -(-length // chunk)
    if chunks > MAX_GRID_YZ or batch * heads > MAX_GRID_YZ:
        raise LceError(f"linear_attention (triton): {chunks} chunks of {chunk} positions and B * H = {batch} * {heads} "
                       f"= {batch * heads} must each be at most {MAX_GRID_YZ} (CUDA's launch-grid limit); split the "
                       "sequence (carry the state on with initial_state) or the batch, or use backend 'ref'")


def _backend(backend: str | None, fk: torch.Tensor) -> str:
    """The resolved backend; ``auto`` takes the reference for dtypes the kernels do not take (float64)."""
    choice = resolve_backend(backend, fk)
    if choice == "triton" and fk.dtype not in TRITON_DTYPES:
        if requested_backend(backend) == "triton":
            raise LceError(f"linear_attention: the triton backend takes float16, bfloat16 or float32 inputs, got "
                           f"{fk.dtype}; use backend 'ref'")
        return "ref"
    return choice


def linear_attention(fq: torch.Tensor | None, fk: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None = None,
                     initial_state: State | None = None, chunk_size: int = 64, backend: str | None = None):
    """Causal linear attention with an optional per-step decay, in chunks (``O(T * C)`` memory, also to train).

    Args:
        fq: ``[B, H, T, F]`` query features aligned with the keys, or None to compute the final state only.
        fk: ``[B, H, T, F]`` key features (zero for keys that must not be seen).
        v: ``[B, H, T, E]``.
        log_decay: ``[B, H, T]`` per-step log-decays ``a_t <= 0`` (retention's ``log γ``, Performer's stabiliser),
            or None for no decay.
        initial_state: ``(S_0 [B, H, F, E], z_0 [B, H, F])``, the state of a preceding prefix, or None (empty).
        chunk_size: ``C``, positions per chunk. The Triton kernels run with ``triton_chunk(chunk_size)``, its next
            power of two within [16, 64] (a block size: the result does not depend on it).
        backend: ``ref``, ``triton`` or ``auto``/None (``lce.kernels.backend``).

    Returns:
        ``num [B, H, T, E]``, ``den [B, H, T]`` (None when ``fq`` is None) and the final state ``(S, z)``; see
        ``lce.kernels.linear_attention.reference`` for the definitions.
    """
    _check(fq, fk, v, log_decay, initial_state, chunk_size)
    if _backend(backend, fk) == "ref":
        return linear_attention_chunked_ref(fq, fk, v, log_decay, initial_state, chunk_size)
    chunk = triton_chunk(chunk_size)
    _check_grid(fk, chunk)
    S0, z0 = (None, None) if initial_state is None else tuple(s.contiguous() for s in initial_state)
    queries = fq if fq is not None else torch.zeros_like(fk)  # state only: queries of zeros read nothing
    num, den, S, z = ChunkedLinearAttentionFunction.apply(queries.contiguous(), fk.contiguous(), v.contiguous(),
                                                          log_decay, S0, z0, chunk)
    return (None, None, (S, z)) if fq is None else (num, den, (S, z))
