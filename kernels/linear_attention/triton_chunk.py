"""Chunkwise causal linear attention with a per-step decay in Triton, forward and backward, on tensor cores.

The kernels follow flash-linear-attention's ``chunk_simple_gla`` (``fla/ops/simple_gla/chunk.py``, ``fla/ops/common/
chunk_h.py``, ``chunk_o.py``): RetNet's chunkwise form (arXiv:2307.08621 eq. 7) with a scalar decay per step and
head, plus Katharopoulos et al.'s normaliser (arXiv:2006.16236 eq. 6). Inputs are contiguous ``q, k [B, H, T, F]``,
``v [B, H, T, E]`` and ``b [B, H, T]``, the log-decays cumulated *inside* each chunk of ``C`` positions (``b_p = a_s
+ ... + a_p`` from the chunk's start ``s``), so every exponent below is ``<= 0`` (no overflow, whatever the decay;
the cross-chunk factors are never split into ``e^{b_p}`` and ``e^{-b_j}``). With ``(h_n [F, E], z_n [F])`` the state
entering chunk ``n``, ``G_n`` the ``b`` of its last position and ``A_pj = e^{b_p - b_j} (q_p·k_j)`` for ``j <= p``
(else 0) the chunk's decayed causal scores::

    forward   h_{n+1} = e^{G_n} h_n + Σ_j e^{G_n - b_j} k_j v_jᵀ,  z_{n+1} likewise without v   (chunk_state_fwd_kernel)
              o_p     = e^{b_p} q_p h_n + Σ_j A_pj v_j
              den_p   = e^{b_p} q_p·z_n + Σ_j A_pj                                            (chunk_output_fwd_kernel)
    backward  (D_n, d_n) = dL/d(h_{n+1}, z_{n+1}):
              D_{n-1} = e^{G_n} D_n + Σ_p e^{b_p} q_pᵀ do_p,  d_{n-1} = e^{G_n} d_n + Σ_p e^{b_p} dden_p q_p
                                                                                             (chunk_state_bwd_kernel)
              dS_pj   = e^{b_p - b_j} (do_p·v_j + dden_p) for j <= p, else 0
              dq_p    = e^{b_p} (do_p h_nᵀ + dden_p z_n) + Σ_j dS_pj k_j
              dk_j    = e^{G_n - b_j} (v_j D_nᵀ + d_n) + Σ_p dS_pj q_p                         (chunk_dqk_bwd_kernel)
              dv_j    = e^{G_n - b_j} k_j D_n + Σ_p A_pj do_p                                  (chunk_dv_bwd_kernel)

The normaliser is not a value channel of ones (which would widen ``E`` by one: a third, nearly empty ``BV`` block at
``E = 128``, and rows misaligned for vector loads): ``z`` is a running key sum beside ``h``, ``den`` the row sums of
``A`` plus ``e^{b_p} q_p·z_n``, reduced on the CUDA cores in fp32 while the tensor cores do the dots.

Precision: every ``tl.dot`` accumulates in fp32. Operands are the inputs' dtype: bf16/fp16 inputs multiply on tensor
cores (wgmma on Hopper, mma on Ampere; a product of two 16-bit numbers is exact in fp32), so what is computed in fp32
and fed to a further dot (the decayed keys or queries, the score matrices ``A`` and ``dS``, the stored states ``h_n``
and ``D_n``) is rounded once to the input dtype first, as flash-linear-attention does; the running states, ``z``,
``den`` and every accumulator stay fp32. fp32 inputs keep fp32 operands and exact IEEE dots (not TF32): the exactness
path. fp16 stores ``h_n`` and ``D_n`` (and returns ``den``) in fp16, whose largest value is 65504: undecayed sums
over very long sequences can overflow there; bf16 has fp32's range.

Memory is ``O(T)``: the states ``h_n`` (and ``D_n``), ``T / C`` of ``F x E`` each, are written by one kernel and read
by the next; the backward recomputes ``h_n`` rather than keeping them from the forward. Positions past ``T`` are
masked to zero and take the log-decay of the chunk's last position (so every exponent stays ``<= 0``): a length that
is not a multiple of ``C`` needs no padding copies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lce.kernels.backend import on_device_of
from lce.kernels.triton_precision import dot as _dot
from lce.kernels.triton_precision import round_to as _to


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
def _causal_decay(b, C: tl.constexpr, TRANSPOSED: tl.constexpr):
    """``[C, C]``: ``e^{b_p - b_j}`` at row ``p``, column ``j`` where ``j <= p``, else 0 (the exponent is masked
    before ``exp``); ``TRANSPOSED``: at row ``j``, column ``p``."""
    row = tl.arange(0, C)[:, None]
    col = tl.arange(0, C)[None, :]
    if TRANSPOSED:
        return tl.exp(tl.where(col >= row, b[None, :] - b[:, None], float("-inf")))
    return tl.exp(tl.where(row >= col, b[:, None] - b[None, :], float("-inf")))


@triton.jit
def _causal(x, C: tl.constexpr, TRANSPOSED: tl.constexpr):
    """``x [C, C]`` with the entries above the diagonal (``TRANSPOSED``: below it) zeroed."""
    row = tl.arange(0, C)[:, None]
    col = tl.arange(0, C)[None, :]
    if TRANSPOSED:
        return tl.where(col >= row, x, 0.0)
    return tl.where(row >= col, x, 0.0)


@triton.jit
def _load_rows(ptr, chunk, col_block, T, width, C: tl.constexpr, BLOCK: tl.constexpr):
    """The ``[C, BLOCK]`` tile of a contiguous ``[T, width]`` matrix at rows of ``chunk``, columns of ``col_block``,
    in the matrix's dtype (zero outside)."""
    t = chunk * C + tl.arange(0, C)[:, None]
    col = col_block * BLOCK + tl.arange(0, BLOCK)[None, :]
    return tl.load(ptr + t * width + col, mask=(t < T) & (col < width), other=0.0)


@triton.jit
def _store_rows(ptr, value, chunk, col_block, T, width, C: tl.constexpr, BLOCK: tl.constexpr):
    t = chunk * C + tl.arange(0, C)[:, None]
    col = col_block * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(ptr + t * width + col, _to(value, ptr.dtype.element_ty), mask=(t < T) & (col < width))


@triton.jit
def _load_positions(ptr, chunk, T, C: tl.constexpr):
    """``[C]`` fp32 entries of a ``[T]`` vector at the positions of ``chunk`` (zero past ``T``)."""
    t = chunk * C + tl.arange(0, C)
    return tl.load(ptr + t, mask=t < T, other=0.0).to(tl.float32)


@triton.jit
def _state_offsets(i_k, i_v, F, E, BK: tl.constexpr, BV: tl.constexpr):
    """Offsets and mask of the ``[BK, BV]`` tile ``(i_k, i_v)`` of a contiguous ``[F, E]`` state."""
    f = i_k * BK + tl.arange(0, BK)[:, None]
    e = i_v * BV + tl.arange(0, BV)[None, :]
    return f * E + e, (f < F) & (e < E)


@triton.jit
def chunk_state_fwd_kernel(k_ptr, v_ptr, b_ptr, h0_ptr, z0_ptr, h_ptr, z_ptr, ht_ptr, zt_ptr, T, F, E, NT,
                           C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_DECAY: tl.constexpr,
                           HAS_INITIAL: tl.constexpr, STORE_STATES: tl.constexpr):
    """One ``[BK, BV]`` tile of ``h`` (and, in the ``i_v = 0`` programs, the ``[BK]`` block of ``z``) of one
    (batch, head), carried through the chunks in order; ``h_n`` stored in ``h_ptr``'s dtype, ``z_n`` in fp32."""
    i_kv, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    n_v = tl.cdiv(E, BV)
    i_k, i_v = i_kv // n_v, i_kv % n_v
    k_ptr += i_bh * T * F
    v_ptr += i_bh * T * E
    b_ptr += i_bh * T
    offsets, mask = _state_offsets(i_k, i_v, F, E, BK, BV)
    f = i_k * BK + tl.arange(0, BK)
    z_mask = f < tl.where(i_v == 0, F, 0)  # z is stored by the i_v = 0 programs
    state = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    if HAS_INITIAL:
        state += tl.load(h0_ptr + i_bh * F * E + offsets, mask=mask, other=0.0).to(tl.float32)
        z += tl.load(z0_ptr + i_bh * F + f, mask=f < F, other=0.0).to(tl.float32)
    for n in range(NT):
        if STORE_STATES:
            tl.store(h_ptr + (i_bh * NT + n) * F * E + offsets, _to(state, h_ptr.dtype.element_ty), mask=mask)
            tl.store(z_ptr + (i_bh * NT + n) * F + f, z, mask=z_mask)
        k = _load_rows(k_ptr, n, i_k, T, F, C, BK)
        v = _load_rows(v_ptr, n, i_v, T, E, C, BV)
        k_end = k.to(tl.float32)
        if USE_DECAY:
            b, last = _chunk_decays(b_ptr, n, T, C)
            k_end = k_end * tl.exp(last - b)[:, None]
            state = state * tl.exp(last)
            z = z * tl.exp(last)
        z += tl.sum(k_end, 0)
        state = _dot(tl.trans(_to(k_end, k.dtype)), v, state)
    tl.store(ht_ptr + i_bh * F * E + offsets, state, mask=mask)
    tl.store(zt_ptr + i_bh * F + f, z, mask=z_mask)


@triton.jit
def chunk_output_fwd_kernel(q_ptr, k_ptr, v_ptr, b_ptr, h_ptr, z_ptr, o_ptr, den_ptr, T, F, E, NT,
                            C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_DECAY: tl.constexpr):
    """``o`` of one chunk, one ``BV`` block of value channels; ``den`` of the chunk (stored by the ``i_v = 0``
    programs)."""
    i_v, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    q_ptr += i_bh * T * F
    k_ptr += i_bh * T * F
    v_ptr += i_bh * T * E
    o_ptr += i_bh * T * E
    den_ptr += i_bh * T
    h_ptr += (i_bh * NT + n) * F * E
    z_ptr += (i_bh * NT + n) * F
    out = tl.zeros([C, BV], dtype=tl.float32)
    scores = tl.zeros([C, C], dtype=tl.float32)
    from_z = tl.zeros([C], dtype=tl.float32)
    for i_k in range(tl.cdiv(F, BK)):
        q = _load_rows(q_ptr, n, i_k, T, F, C, BK)
        k = _load_rows(k_ptr, n, i_k, T, F, C, BK)
        offsets, mask = _state_offsets(i_k, i_v, F, E, BK, BV)
        out = _dot(q, tl.load(h_ptr + offsets, mask=mask, other=0.0), out)
        scores = _dot(q, tl.trans(k), scores)
        f = i_k * BK + tl.arange(0, BK)
        from_z += tl.sum(q.to(tl.float32) * tl.load(z_ptr + f, mask=f < F, other=0.0)[None, :], 1)
    if USE_DECAY:
        b, _ = _chunk_decays(b_ptr + i_bh * T, n, T, C)
        out = out * tl.exp(b)[:, None]
        from_z = from_z * tl.exp(b)
        scores = scores * _causal_decay(b, C, False)
    else:
        scores = _causal(scores, C, False)
    v = _load_rows(v_ptr, n, i_v, T, E, C, BV)
    out = _dot(_to(scores, v.dtype), v, out)
    _store_rows(o_ptr, out, n, i_v, T, E, C, BV)
    t = n * C + tl.arange(0, C)
    den = from_z + tl.sum(scores, 1)
    tl.store(den_ptr + t, _to(den, den_ptr.dtype.element_ty), mask=t < tl.where(i_v == 0, T, 0))  # once per chunk


@triton.jit
def chunk_state_bwd_kernel(q_ptr, do_ptr, dden_ptr, b_ptr, dht_ptr, dzt_ptr, dh_ptr, dz_ptr, dh0_ptr, dz0_ptr, T, F,
                           E, NT, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_DECAY: tl.constexpr):
    """One ``[BK, BV]`` tile of ``D_n`` (and, in the ``i_v = 0`` programs, the ``[BK]`` block of ``d_n``), carried
    through the chunks in reverse; ``dh0``, ``dz0`` are the initial state's gradients (fp32)."""
    i_kv, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    n_v = tl.cdiv(E, BV)
    i_k, i_v = i_kv // n_v, i_kv % n_v
    q_ptr += i_bh * T * F
    do_ptr += i_bh * T * E
    dden_ptr += i_bh * T
    b_ptr += i_bh * T
    offsets, mask = _state_offsets(i_k, i_v, F, E, BK, BV)
    f = i_k * BK + tl.arange(0, BK)
    z_mask = f < tl.where(i_v == 0, F, 0)  # z is stored by the i_v = 0 programs
    grad = tl.load(dht_ptr + i_bh * F * E + offsets, mask=mask, other=0.0).to(tl.float32)
    grad_z = tl.load(dzt_ptr + i_bh * F + f, mask=f < F, other=0.0).to(tl.float32)
    for step in range(NT):
        n = NT - 1 - step
        tl.store(dh_ptr + (i_bh * NT + n) * F * E + offsets, _to(grad, dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_ptr + (i_bh * NT + n) * F + f, grad_z, mask=z_mask)
        q = _load_rows(q_ptr, n, i_k, T, F, C, BK)
        do = _load_rows(do_ptr, n, i_v, T, E, C, BV)
        q_start = q.to(tl.float32)
        if USE_DECAY:
            b, last = _chunk_decays(b_ptr, n, T, C)
            q_start = q_start * tl.exp(b)[:, None]
            grad = grad * tl.exp(last)
            grad_z = grad_z * tl.exp(last)
        grad_z += tl.sum(q_start * _load_positions(dden_ptr, n, T, C)[:, None], 0)
        grad = _dot(tl.trans(_to(q_start, q.dtype)), do, grad)
    tl.store(dh0_ptr + i_bh * F * E + offsets, grad, mask=mask)
    tl.store(dz0_ptr + i_bh * F + f, grad_z, mask=z_mask)


@triton.jit
def chunk_dv_bwd_kernel(q_ptr, k_ptr, b_ptr, do_ptr, dh_ptr, dv_ptr, T, F, E, NT,
                        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_DECAY: tl.constexpr):
    """``dv`` of one chunk, one ``BV`` block of value channels. The scores are built transposed (``Aᵀ = K Qᵀ``), so
    ``Aᵀ dO`` takes them as they are."""
    i_v, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    q_ptr += i_bh * T * F
    k_ptr += i_bh * T * F
    do_ptr += i_bh * T * E
    dv_ptr += i_bh * T * E
    dh_ptr += (i_bh * NT + n) * F * E
    from_state = tl.zeros([C, BV], dtype=tl.float32)
    scores_t = tl.zeros([C, C], dtype=tl.float32)
    for i_k in range(tl.cdiv(F, BK)):
        q = _load_rows(q_ptr, n, i_k, T, F, C, BK)
        k = _load_rows(k_ptr, n, i_k, T, F, C, BK)
        offsets, mask = _state_offsets(i_k, i_v, F, E, BK, BV)
        from_state = _dot(k, tl.load(dh_ptr + offsets, mask=mask, other=0.0), from_state)
        scores_t = _dot(k, tl.trans(q), scores_t)
    if USE_DECAY:
        b, last = _chunk_decays(b_ptr + i_bh * T, n, T, C)
        from_state = from_state * tl.exp(last - b)[:, None]
        scores_t = scores_t * _causal_decay(b, C, True)
    else:
        scores_t = _causal(scores_t, C, True)
    do = _load_rows(do_ptr, n, i_v, T, E, C, BV)
    dv = _dot(_to(scores_t, do.dtype), do, from_state)
    _store_rows(dv_ptr, dv, n, i_v, T, E, C, BV)


@triton.jit
def chunk_dqk_bwd_kernel(q_ptr, k_ptr, v_ptr, b_ptr, h_ptr, z_ptr, do_ptr, dden_ptr, dh_ptr, dz_ptr, dq_ptr, dk_ptr,
                         T, F, E, NT, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, USE_DECAY: tl.constexpr):
    """``dq`` and ``dk`` of one chunk, one ``BK`` block of feature channels (fp32)."""
    i_k, n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    q_ptr += i_bh * T * F
    k_ptr += i_bh * T * F
    v_ptr += i_bh * T * E
    do_ptr += i_bh * T * E
    dden_ptr += i_bh * T
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
        dq = _dot(do, tl.trans(tl.load(h_ptr + offsets, mask=mask, other=0.0)), dq)
        dk = _dot(v, tl.trans(tl.load(dh_ptr + offsets, mask=mask, other=0.0)), dk)
        grad_scores = _dot(do, tl.trans(v), grad_scores)
    # The normaliser is the numerator of a value channel of ones: its gradient ``dden`` joins ``do·v`` in every
    # score's gradient, and ``z_n``, ``d_n`` join the state terms.
    dden = _load_positions(dden_ptr, n, T, C)
    f = i_k * BK + tl.arange(0, BK)
    dq += dden[:, None] * tl.load(z_ptr + (i_bh * NT + n) * F + f, mask=f < F, other=0.0)[None, :]
    dk += tl.load(dz_ptr + (i_bh * NT + n) * F + f, mask=f < F, other=0.0)[None, :]
    grad_scores += dden[:, None]
    if USE_DECAY:
        b, last = _chunk_decays(b_ptr + i_bh * T, n, T, C)
        dq = dq * tl.exp(b)[:, None]
        dk = dk * tl.exp(last - b)[:, None]
        grad_scores = grad_scores * _causal_decay(b, C, False)
    else:
        grad_scores = _causal(grad_scores, C, False)
    k = _load_rows(k_ptr, n, i_k, T, F, C, BK)
    q = _load_rows(q_ptr, n, i_k, T, F, C, BK)
    grad_scores = _to(grad_scores, k.dtype)
    dq = _dot(grad_scores, k, dq)
    dk = _dot(tl.trans(grad_scores), q, dk)
    _store_rows(dq_ptr, dq, n, i_k, T, F, C, BK)
    _store_rows(dk_ptr, dk, n, i_k, T, F, C, BK)


#: Warps and pipeline stages of every chunk kernel launch with bf16/fp16 inputs (stated so ``lce.kernels.inspect``
#: compiles what runs): on sm_90 every kernel compiles to wgmma without spills, at most 188 registers, <= 96 KiB of
#: shared memory (flash-linear-attention's chunk kernels autotune over 2-8 warps and 2-4 stages around this).
LAUNCH_OPTIONS = {"num_warps": 4, "num_stages": 3}
#: fp32 inputs: IEEE dots on the CUDA cores hold each ``64 x 64`` fp32 product in registers; at 4 warps the dq/dk
#: kernel spills 31 KB per thread, at 8 warps and 2 stages under 0.6 KB (the others 0-196 B).
FP32_LAUNCH_OPTIONS = {"num_warps": 8, "num_stages": 2}


def launch_options(dtype: torch.dtype) -> dict:
    """``num_warps`` and ``num_stages`` of the chunk kernels for inputs of ``dtype``."""
    return dict(FP32_LAUNCH_OPTIONS if dtype == torch.float32 else LAUNCH_OPTIONS)


def _tiles(features: int, channels: int) -> tuple[int, int]:
    """Feature and value block sizes: powers of two in [16, 64] (``tl.dot`` needs >= 16)."""
    return (min(64, max(16, triton.next_power_of_2(features))), min(64, max(16, triton.next_power_of_2(channels))))


def chunk_states(k, v, b, h0, z0, chunk_size: int, store_states: bool):
    """The states entering every chunk, ``h [B, H, N, F, E]`` (in ``k.dtype``: the next kernels' dot operands) and
    ``z [B, H, N, F]`` (fp32), or None unless ``store_states``, and the final state ``([B, H, F, E], [B, H, F])``
    (fp32)."""
    batch, heads, length, features = k.shape
    channels, chunks = v.shape[-1], triton.cdiv(length, chunk_size)
    bk, bv = _tiles(features, channels)
    states = z_states = None
    if store_states:
        states = k.new_empty(batch, heads, chunks, features, channels)
        z_states = k.new_empty(batch, heads, chunks, features, dtype=torch.float32)
    final = k.new_empty(batch, heads, features, channels, dtype=torch.float32)
    final_z = k.new_empty(batch, heads, features, dtype=torch.float32)
    grid = (triton.cdiv(features, bk) * triton.cdiv(channels, bv), batch * heads)
    with on_device_of(k):
        chunk_state_fwd_kernel[grid](
            k, v, b if b is not None else k, h0 if h0 is not None else final, z0 if z0 is not None else final_z,
            states if store_states else final, z_states if store_states else final_z, final, final_z, length,
            features, channels, chunks, C=chunk_size, BK=bk, BV=bv, USE_DECAY=b is not None,
            HAS_INITIAL=h0 is not None, STORE_STATES=store_states, **launch_options(k.dtype))
    return states, z_states, final, final_z


def chunk_forward(q, k, v, b, h0, z0, chunk_size: int):
    """``o [B, H, T, E]``, ``den [B, H, T]`` (in ``v.dtype``) and the final state ``([B, H, F, E], [B, H, F])``
    (fp32).

    Args:
        q, k: ``[B, H, T, F]``; v: ``[B, H, T, E]``; all contiguous, of one dtype.
        b: ``[B, H, T]`` fp32 log-decays cumulated inside chunks, or None (no decay).
        h0, z0: ``[B, H, F, E]``, ``[B, H, F]`` contiguous initial state, or None (both).
        chunk_size: ``C``, a power of two in [16, 64] (``function.triton_chunk``).
    """
    batch, heads, length, features = q.shape
    channels = v.shape[-1]
    states, z_states, final, final_z = chunk_states(k, v, b, h0, z0, chunk_size, store_states=True)
    out = torch.empty_like(v)
    den = v.new_empty(batch, heads, length)
    bk, bv = _tiles(features, channels)
    grid = (triton.cdiv(channels, bv), states.shape[2], batch * heads)
    with on_device_of(q):
        chunk_output_fwd_kernel[grid](q, k, v, b if b is not None else q, states, z_states, out, den, length, features,
                                      channels, states.shape[2], C=chunk_size, BK=bk, BV=bv, USE_DECAY=b is not None,
                                      **launch_options(q.dtype))
    return out, den, final, final_z


def chunk_backward(q, k, v, b, h0, z0, do, dden, dht, dzt, chunk_size: int):
    """``dq, dk [B, H, T, F]`` (fp32), ``dv [B, H, T, E]`` (in ``v.dtype``) and the initial state's gradients
    ``[B, H, F, E]``, ``[B, H, F]`` (fp32).

    Args:
        q, k, v, b, h0, z0, chunk_size: as ``chunk_forward``.
        do: ``[B, H, T, E]`` contiguous gradient of the output, in ``v.dtype``.
        dden: ``[B, H, T]`` contiguous gradient of the normaliser.
        dht, dzt: ``[B, H, F, E]``, ``[B, H, F]`` contiguous gradients of the final state.
    """
    batch, heads, length, features = q.shape
    channels = v.shape[-1]
    states, z_states, _, _ = chunk_states(k, v, b, h0, z0, chunk_size, store_states=True)
    chunks = states.shape[2]
    bk, bv = _tiles(features, channels)
    decays = b if b is not None else q
    state_grads = torch.empty_like(states)
    z_grads = torch.empty_like(z_states)
    dh0 = torch.empty_like(dht, dtype=torch.float32)
    dz0 = torch.empty_like(dzt, dtype=torch.float32)
    dq, dk = (torch.empty(q.shape, dtype=torch.float32, device=q.device) for _ in range(2))
    dv = torch.empty_like(v)
    with on_device_of(q):
        chunk_state_bwd_kernel[(triton.cdiv(features, bk) * triton.cdiv(channels, bv), batch * heads)](
            q, do, dden, decays, dht, dzt, state_grads, z_grads, dh0, dz0, length, features, channels, chunks,
            C=chunk_size, BK=bk, BV=bv, USE_DECAY=b is not None, **launch_options(q.dtype))
        chunk_dv_bwd_kernel[(triton.cdiv(channels, bv), chunks, batch * heads)](
            q, k, decays, do, state_grads, dv, length, features, channels, chunks, C=chunk_size, BK=bk, BV=bv,
            USE_DECAY=b is not None, **launch_options(q.dtype))
        chunk_dqk_bwd_kernel[(triton.cdiv(features, bk), chunks, batch * heads)](
            q, k, v, decays, states, z_states, do, dden, state_grads, z_grads, dq, dk, length, features, channels,
            chunks, C=chunk_size, BK=bk, BV=bv, USE_DECAY=b is not None, **launch_options(q.dtype))
    return dq, dk, dv, dh0, dz0
