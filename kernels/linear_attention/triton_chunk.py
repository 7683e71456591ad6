"""Chunkwise causal linear attention with a per-step decay in Triton, forward and backward.

The kernels follow flash-linear-attention's ``chunk_simple_gla`` (``fla/ops/simple_gla/chunk.py``): RetNet's
chunkwise form (arXiv:2307.08621 eq. 7) with a scalar decay per step and head. Inputs are contiguous ``q, k
[B, H, T, F]``, ``v [B, H, T, E]`` and ``b [B, H, T]``, the log-decays cumulated *inside* each chunk of ``C``
positions (``b_p = a_s + ... + a_p`` from the chunk's start ``s``), so every exponent below is ``<= 0`` (no overflow,
whatever the decay; the cross-chunk factors are never split into ``e^{b_p}`` and ``e^{-b_j}``). With ``h_n
[F, E]`` the state entering chunk ``n`` and ``G_n`` the ``b`` of its last position:

    forward   h_{n+1} = e^{G_n} h_n + Σ_j e^{G_n - b_j} k_j v_jᵀ                      (chunk_state_fwd_kernel)
              o_p     = e^{b_p} q_p h_n + Σ_{j<=p} e^{b_p - b_j} (q_p·k_j) v_j        (chunk_output_fwd_kernel)
    backward  D_n     = dL/dh_{n+1}:  D_{n-1} = e^{G_n} D_n + Σ_p e^{b_p} q_pᵀ do_p     (chunk_state_bwd_kernel)
              dq_p    = e^{b_p} do_p h_nᵀ + Σ_{j<=p} e^{b_p - b_j} (do_p·v_j) k_j
              dk_j    = e^{G_n - b_j} v_j D_nᵀ + Σ_{p>=j} e^{b_p - b_j} (do_p·v_j) q_p  (chunk_dqk_bwd_kernel)
              dv_j    = e^{G_n - b_j} k_j D_n + Σ_{p>=j} e^{b_p - b_j} (q_p·k_j) do_p   (chunk_dv_bwd_kernel)

Memory is ``O(T)``: the states ``h_n`` (and ``D_n``), ``T / C`` of ``F x E`` each, are written by one kernel and read
by the next; the backward recomputes ``h_n`` rather than keeping them from the forward. Loads and math are fp32
(``tl.dot`` in IEEE fp32, not TF32). Positions past ``T`` are masked to zero and take the log-decay of the chunk's
last position (so every exponent stays ``<= 0``): a length that is not a multiple of ``C`` needs no padding copies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lce.kernels.backend import on_device_of


@triton.jit
def _chunk_decays(b_ptr, chunk, T, C: tl.constexpr):
    """``b`` of the chunk's positions ``[C]`` and ``G``, the ``b`` of its last position. Positions past ``T`` take
    ``G`` too: with 0 there, ``e^{b_p - b_j}`` of a padding row ``p`` reaches ``e^{-b_j}``, which overflows to inf
    under strong decays (``b_j < -88``), and inf times the row's zero features is NaN in ``dk`` and ``dv``."""
    t = chunk * C + tl.arange(0, C)
    last = tl.load(b_ptr + tl.minimum(chunk * C + C - 1, T - 1))
    b = tl.where(t < T, tl.load(b_ptr + t, mask=t < T, other=0.0), last)
    return b, last


@triton.jit
def _causal_decay(b, C: tl.constexpr):
    """``[C, C]``: ``e^{b_p - b_j}`` where ``j <= p``, else 0 (the exponent is masked before ``exp``)."""
    p = tl.arange(0, C)[:, None]
    j = tl.arange(0, C)[None, :]
    return tl.exp(tl.where(p >= j, b[:, None] - b[None, :], float("-inf")))


@triton.jit
def _load_rows(ptr, chunk, col_block, T, width, C: tl.constexpr, BLOCK: tl.constexpr):
    """The ``[C, BLOCK]`` tile of a contiguous ``[T, width]`` matrix at rows of ``chunk``, columns of ``col_block``,
    in fp32 (zero outside)."""
    t = chunk * C + tl.arange(0, C)[:, None]
    col = col_block * BLOCK + tl.arange(0, BLOCK)[None, :]
    return tl.load(ptr + t * width + col, mask=(t < T) & (col < width), other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, value, chunk, col_block, T, width, C: tl.constexpr, BLOCK: tl.constexpr):
    t = chunk * C + tl.arange(0, C)[:, None]
    col = col_block * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(ptr + t * width + col, value.to(ptr.dtype.element_ty), mask=(t < T) & (col < width))


@triton.jit
def _state_offsets(i_k, i_v, F, E, BK: tl.constexpr, BV: tl.constexpr):
    """Offsets and mask of the ``[BK, BV]`` tile ``(i_k, i_v)`` of a contiguous ``[F, E]`` state."""
    f = i_k * BK + tl.arange(0, BK)[:, None]
    e = i_v * BV + tl.arange(0, BV)[None, :]
    return f * E + e, (f < F) & (e < E)


@triton.jit
def chunk_state_fwd_kernel(k_ptr, v_ptr, b_ptr, h0_ptr, h_ptr, ht_ptr, T, F, E, NT,
                           C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_DECAY: tl.constexpr,
                           HAS_INITIAL: tl.constexpr, STORE_STATES: tl.constexpr):
    """One ``[BK, BV]`` tile of the state of one (batch, head), carried through the chunks in order."""
    i_kv, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    n_v = tl.cdiv(E, BV)
    i_k, i_v = i_kv // n_v, i_kv % n_v
    k_ptr += i_bh * T * F
    v_ptr += i_bh * T * E
    b_ptr += i_bh * T
    offsets, mask = _state_offsets(i_k, i_v, F, E, BK, BV)
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INITIAL:
        state += tl.load(h0_ptr + i_bh * F * E + offsets, mask=mask, other=0.0).to(tl.float32)
    for n in range(NT):
        if STORE_STATES:
            tl.store(h_ptr + (i_bh * NT + n) * F * E + offsets, state, mask=mask)
        k = _load_rows(k_ptr, n, i_k, T, F, C, BK)
        v = _load_rows(v_ptr, n, i_v, T, E, C, BV)
        if USE_DECAY:
            b, last = _chunk_decays(b_ptr, n, T, C)
            k = k * tl.exp(last - b)[:, None]
            state = state * tl.exp(last)
        state += tl.dot(tl.trans(k), v, input_precision="ieee")
    tl.store(ht_ptr + i_bh * F * E + offsets, state, mask=mask)


@triton.jit
def chunk_output_fwd_kernel(q_ptr, k_ptr, v_ptr, b_ptr, h_ptr, o_ptr, T, F, E, NT,
                            C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_DECAY: tl.constexpr):
    """``o`` of one chunk, one ``BV`` block of value channels."""
    i_v, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    q_ptr += i_bh * T * F
    k_ptr += i_bh * T * F
    v_ptr += i_bh * T * E
    o_ptr += i_bh * T * E
    h_ptr += (i_bh * NT + n) * F * E
    out = tl.zeros([C, BV], dtype=tl.float32)
    scores = tl.zeros([C, C], dtype=tl.float32)
    for i_k in range(tl.cdiv(F, BK)):
        q = _load_rows(q_ptr, n, i_k, T, F, C, BK)
        k = _load_rows(k_ptr, n, i_k, T, F, C, BK)
        offsets, mask = _state_offsets(i_k, i_v, F, E, BK, BV)
        out += tl.dot(q, tl.load(h_ptr + offsets, mask=mask, other=0.0), input_precision="ieee")
        scores += tl.dot(q, tl.trans(k), input_precision="ieee")
    if USE_DECAY:
        b, _ = _chunk_decays(b_ptr + i_bh * T, n, T, C)
        out = out * tl.exp(b)[:, None]
        scores = scores * _causal_decay(b, C)
    else:
        scores = tl.where(tl.arange(0, C)[:, None] >= tl.arange(0, C)[None, :], scores, 0.0)
    out += tl.dot(scores, _load_rows(v_ptr, n, i_v, T, E, C, BV), input_precision="ieee")
    _store_rows(o_ptr, out, n, i_v, T, E, C, BV)


@triton.jit
def chunk_state_bwd_kernel(q_ptr, do_ptr, b_ptr, dht_ptr, dh_ptr, dh0_ptr, T, F, E, NT,
                           C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_DECAY: tl.constexpr):
    """One ``[BK, BV]`` tile of ``D_n``, carried through the chunks in reverse; ``dh0`` is the initial state's grad."""
    i_kv, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    n_v = tl.cdiv(E, BV)
    i_k, i_v = i_kv // n_v, i_kv % n_v
    q_ptr += i_bh * T * F
    do_ptr += i_bh * T * E
    b_ptr += i_bh * T
    offsets, mask = _state_offsets(i_k, i_v, F, E, BK, BV)
    grad = tl.load(dht_ptr + i_bh * F * E + offsets, mask=mask, other=0.0).to(tl.float32)
    for step in range(NT):
        n = NT - 1 - step
        tl.store(dh_ptr + (i_bh * NT + n) * F * E + offsets, grad, mask=mask)
        q = _load_rows(q_ptr, n, i_k, T, F, C, BK)
        do = _load_rows(do_ptr, n, i_v, T, E, C, BV)
        if USE_DECAY:
            b, last = _chunk_decays(b_ptr, n, T, C)
            q = q * tl.exp(b)[:, None]
            grad = grad * tl.exp(last)
        grad += tl.dot(tl.trans(q), do, input_precision="ieee")
    tl.store(dh0_ptr + i_bh * F * E + offsets, grad, mask=mask)


@triton.jit
def chunk_dv_bwd_kernel(q_ptr, k_ptr, b_ptr, do_ptr, dh_ptr, dv_ptr, T, F, E, NT,
                        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_DECAY: tl.constexpr):
    """``dv`` of one chunk, one ``BV`` block of value channels."""
    i_v, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    q_ptr += i_bh * T * F
    k_ptr += i_bh * T * F
    do_ptr += i_bh * T * E
    dv_ptr += i_bh * T * E
    dh_ptr += (i_bh * NT + n) * F * E
    from_state = tl.zeros([C, BV], dtype=tl.float32)
    scores = tl.zeros([C, C], dtype=tl.float32)
    for i_k in range(tl.cdiv(F, BK)):
        q = _load_rows(q_ptr, n, i_k, T, F, C, BK)
        k = _load_rows(k_ptr, n, i_k, T, F, C, BK)
        offsets, mask = _state_offsets(i_k, i_v, F, E, BK, BV)
        from_state += tl.dot(k, tl.load(dh_ptr + offsets, mask=mask, other=0.0), input_precision="ieee")
        scores += tl.dot(q, tl.trans(k), input_precision="ieee")
    if USE_DECAY:
        b, last = _chunk_decays(b_ptr + i_bh * T, n, T, C)
        from_state = from_state * tl.exp(last - b)[:, None]
        scores = scores * _causal_decay(b, C)
    else:
        scores = tl.where(tl.arange(0, C)[:, None] >= tl.arange(0, C)[None, :], scores, 0.0)
    dv = from_state + tl.dot(tl.trans(scores), _load_rows(do_ptr, n, i_v, T, E, C, BV), input_precision="ieee")
    _store_rows(dv_ptr, dv, n, i_v, T, E, C, BV)


@triton.jit
def chunk_dqk_bwd_kernel(q_ptr, k_ptr, v_ptr, b_ptr, h_ptr, do_ptr, dh_ptr, dq_ptr, dk_ptr, T, F, E, NT,
                         C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_DECAY: tl.constexpr):
    """``dq`` and ``dk`` of one chunk, one ``BK`` block of feature channels."""
    i_k, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    q_ptr += i_bh * T * F
    k_ptr += i_bh * T * F
    v_ptr += i_bh * T * E
    do_ptr += i_bh * T * E
    dq_ptr += i_bh * T * F
    dk_ptr += i_bh * T * F
    h_ptr += (i_bh * NT + n) * F * E
    dh_ptr += (i_bh * NT + n) * F * E
    dq = tl.zeros([C, BK], dtype=tl.float32)
    dk = tl.zeros([C, BK], dtype=tl.float32)
    grad_scores = tl.zeros([C, C], dtype=tl.float32)
    for i_v in range(tl.cdiv(E, BV)):
        do = _load_rows(do_ptr, n, i_v, T, E, C, BV)
        v = _load_rows(v_ptr, n, i_v, T, E, C, BV)
        offsets, mask = _state_offsets(i_k, i_v, F, E, BK, BV)
        dq += tl.dot(do, tl.trans(tl.load(h_ptr + offsets, mask=mask, other=0.0)), input_precision="ieee")
        dk += tl.dot(v, tl.trans(tl.load(dh_ptr + offsets, mask=mask, other=0.0)), input_precision="ieee")
        grad_scores += tl.dot(do, tl.trans(v), input_precision="ieee")
    if USE_DECAY:
        b, last = _chunk_decays(b_ptr + i_bh * T, n, T, C)
        dq = dq * tl.exp(b)[:, None]
        dk = dk * tl.exp(last - b)[:, None]
        grad_scores = grad_scores * _causal_decay(b, C)
    else:
        grad_scores = tl.where(tl.arange(0, C)[:, None] >= tl.arange(0, C)[None, :], grad_scores, 0.0)
    dq += tl.dot(grad_scores, _load_rows(k_ptr, n, i_k, T, F, C, BK), input_precision="ieee")
    dk += tl.dot(tl.trans(grad_scores), _load_rows(q_ptr, n, i_k, T, F, C, BK), input_precision="ieee")
    _store_rows(dq_ptr, dq, n, i_k, T, F, C, BK)
    _store_rows(dk_ptr, dk, n, i_k, T, F, C, BK)


#: Warps and pipeline stages of every chunk kernel launch (Triton's defaults, stated so ``lce.kernels.inspect``
#: compiles what runs).
LAUNCH_OPTIONS = {"num_warps": 4, "num_stages": 3}


def _tiles(features: int, channels: int) -> tuple[int, int]:
    """Feature and value block sizes: powers of two in [16, 64] (``tl.dot`` needs >= 16)."""
    return (min(64, max(16, triton.next_power_of_2(features))), min(64, max(16, triton.next_power_of_2(channels))))


def chunk_states(k, v, b, h0, chunk_size: int, store_states: bool):
    """The state entering every chunk ``[B, H, N, F, E]`` (fp32, or None unless ``store_states``) and the final state
    ``[B, H, F, E]`` (fp32)."""
    batch, heads, length, features = k.shape
    channels, chunks = v.shape[-1], triton.cdiv(length, chunk_size)
    bk, bv = _tiles(features, channels)
    states = k.new_empty(batch, heads, chunks, features, channels, dtype=torch.float32) if store_states else None
    final = k.new_empty(batch, heads, features, channels, dtype=torch.float32)
    grid = (triton.cdiv(features, bk) * triton.cdiv(channels, bv), batch * heads)
    with on_device_of(k):
        chunk_state_fwd_kernel[grid](
            k, v, b if b is not None else k, h0 if h0 is not None else final, states if store_states else final,
            final, length, features, channels, chunks, C=chunk_size, BK=bk, BV=bv, USE_DECAY=b is not None,
            HAS_INITIAL=h0 is not None, STORE_STATES=store_states, **LAUNCH_OPTIONS)
    return states, final


def chunk_forward(q, k, v, b, h0, chunk_size: int):
    """``o [B, H, T, E]`` (in ``v.dtype``) and the final state ``[B, H, F, E]`` (fp32).

    Args:
        q, k: ``[B, H, T, F]``; v: ``[B, H, T, E]``; all contiguous, of one dtype.
        b: ``[B, H, T]`` fp32 log-decays cumulated inside chunks, or None (no decay).
        h0: ``[B, H, F, E]`` initial state, or None.
        chunk_size: ``C``, a power of two in [16, 64] (``function.triton_chunk``).
    """
    batch, heads, length, features = q.shape
    channels = v.shape[-1]
    states, final = chunk_states(k, v, b, h0, chunk_size, store_states=True)
    out = torch.empty_like(v)
    bk, bv = _tiles(features, channels)
    grid = (triton.cdiv(channels, bv), states.shape[2], batch * heads)
    with on_device_of(q):
        chunk_output_fwd_kernel[grid](q, k, v, b if b is not None else q, states, out, length, features, channels,
                                      states.shape[2], C=chunk_size, BK=bk, BV=bv, USE_DECAY=b is not None,
                                      **LAUNCH_OPTIONS)
    return out, final


def chunk_backward(q, k, v, b, h0, do, dht, chunk_size: int):
    """``dq, dk [B, H, T, F]``, ``dv [B, H, T, E]`` (fp32) and the initial state's gradient ``[B, H, F, E]`` (fp32).

    Args:
        q, k, v, b, h0, chunk_size: as ``chunk_forward``.
        do: ``[B, H, T, E]`` contiguous gradient of the output.
        dht: ``[B, H, F, E]`` contiguous gradient of the final state.
    """
    batch, heads, length, features = q.shape
    channels = v.shape[-1]
    states, _ = chunk_states(k, v, b, h0, chunk_size, store_states=True)
    chunks = states.shape[2]
    bk, bv = _tiles(features, channels)
    decays = b if b is not None else q
    state_grads = torch.empty_like(states)
    dh0 = torch.empty_like(dht, dtype=torch.float32)
    dq, dk = (torch.empty(q.shape, dtype=torch.float32, device=q.device) for _ in range(2))
    dv = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    with on_device_of(q):
        chunk_state_bwd_kernel[(triton.cdiv(features, bk) * triton.cdiv(channels, bv), batch * heads)](
            q, do, decays, dht, state_grads, dh0, length, features, channels, chunks, C=chunk_size, BK=bk, BV=bv,
            USE_DECAY=b is not None, **LAUNCH_OPTIONS)
        chunk_dv_bwd_kernel[(triton.cdiv(channels, bv), chunks, batch * heads)](
            q, k, decays, do, state_grads, dv, length, features, channels, chunks, C=chunk_size, BK=bk, BV=bv,
            USE_DECAY=b is not None, **LAUNCH_OPTIONS)
        chunk_dqk_bwd_kernel[(triton.cdiv(features, bk), chunks, batch * heads)](
            q, k, v, decays, states, do, state_grads, dq, dk, length, features, channels, chunks, C=chunk_size,
            BK=bk, BV=bv, USE_DECAY=b is not None, **LAUNCH_OPTIONS)
    return dq, dk, dv, dh0
