"""Causal linear attention with an optional per-step decay: the readable references and the chunkwise PyTorch form.

Per batch row and head, with features ``φ(q_i), φ(k_j) ∈ R^F`` (applied by the caller), values ``v_j ∈ R^E`` and
per-step log-decays ``a_t <= 0`` (``b_t = a_0 + ... + a_t``; ``a = 0`` without decay)::

    num_i = Σ_{j<=i} e^{b_i - b_j} (φ(q_i)·φ(k_j)) v_j  +  e^{b_i} φ(q_i)ᵀ S_0        [E]
    den_i = Σ_{j<=i} e^{b_i - b_j} (φ(q_i)·φ(k_j))      +  e^{b_i} φ(q_i)·z_0          scalar
    S_T   = Σ_j e^{b_{T-1} - b_j} φ(k_j) v_jᵀ  +  e^{b_{T-1}} S_0,   z_T likewise without v

Katharopoulos et al. 2020 (arXiv:2006.16236, eq. 4-9: ``num / den`` is their causal linear attention) with RetNet's
decay (Sun et al. 2023, arXiv:2307.08621, eq. 5 parallel, eq. 7 chunkwise); ``(S_0, z_0)`` is the state of a
preceding prefix. Three functions, laid out as flash-linear-attention lays out its ops (``fla/ops/*/naive.py``):

- ``linear_attention_parallel``: the outputs from the materialised ``[Tq, Tk]`` scores ``φ(Q)φ(K)ᵀ ⊙ D``.
  ``O(T^2)`` memory; the ground truth.
- ``linear_attention_final_state``: ``(S_T, z_T)`` as the sum above (the recurrence unrolled); the ground truth.
- ``linear_attention_chunked_ref``: RetNet's chunkwise form in PyTorch, ``C x C`` scores inside chunks of ``C``
  positions and a running state across them: ``O(T * C)`` memory also for training (autograd keeps one ``C x C``
  block and one ``F x E`` state per chunk). The ``ref`` backend of ``lce.kernels.linear_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

State = tuple[torch.Tensor, torch.Tensor]


def _decay_sums(log_decay: torch.Tensor) -> torch.Tensor:
    """``b_t = a_0 + ... + a_t`` in fp64: differences of long cumulative sums stay exact enough."""
    return log_decay.double().cumsum(-1)


def linear_attention_parallel(fq, fk, v, log_decay=None, initial_state: State | None = None):
    """Reference: materialised causal scores ``(φ(Q) φ(K)ᵀ ⊙ D) V``.

    Args:
        fq: ``[B, H, Tq, F]`` query features; queries sit at the last ``Tq`` of the ``Tk`` key positions.
        fk: ``[B, H, Tk, F]`` key features (zero for keys that must not be seen).
        v: ``[B, H, Tk, E]``.
        log_decay: ``[B, H, Tk]`` per-step log-decays ``a_t <= 0``, or None for no decay.
        initial_state: ``(S_0 [B, H, F, E], z_0 [B, H, F])``, the state before key 0, or None (empty).

    Returns:
        ``num [B, H, Tq, E]`` and ``den [B, H, Tq]``.
    """
    tq, tk = fq.shape[2], fk.shape[2]
    i = torch.arange(tk - tq, tk, device=fq.device)[:, None]
    j = torch.arange(tk, device=fq.device)[None, :]
    causal = j <= i
    scores = fq @ fk.transpose(-1, -2)
    if log_decay is None:
        weights = scores.masked_fill(~causal, 0.0)
    else:
        b = _decay_sums(log_decay)
        gap = (b[..., tk - tq:, None] - b[..., None, :]).masked_fill(~causal, float("-inf"))
        weights = scores * gap.exp().to(scores.dtype)
    num, den = weights @ v, weights.sum(-1)
    if initial_state is not None:
        S0, z0 = initial_state
        q_start = fq if log_decay is None else fq * b[..., tk - tq:, None].exp().to(fq.dtype)
        num, den = num + q_start @ S0, den + (q_start * z0[..., None, :]).sum(-1)
    return num, den


def linear_attention_final_state(fk, v, log_decay=None, initial_state: State | None = None) -> State:
    """Reference: the state after the last position, ``(S_T [B, H, F, E], z_T [B, H, F])``; arguments as
    ``linear_attention_parallel``."""
    b = None if log_decay is None else _decay_sums(log_decay)
    k_end = fk if b is None else fk * (b[..., -1:] - b).exp().to(fk.dtype)[..., None]  # each key decayed to the end
    S, z = k_end.transpose(-1, -2) @ v, k_end.sum(-2)
    if initial_state is not None:
        S0, z0 = initial_state
        if b is not None:
            through = b[..., -1].exp().to(fk.dtype)  # [B, H]
            S0, z0 = S0 * through[..., None, None], z0 * through[..., None]
        S, z = S + S0, z + z0
    return S, z


def _blocks(x: torch.Tensor, chunks: int, size: int) -> torch.Tensor:
    """``[B, H, T, ...] -> [B, H, chunks, size, ...]``, zero-padded at the end (padding adds nothing, decays
    nothing)."""
    pad = chunks * size - x.shape[2]
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.reshape(*x.shape[:2], chunks, size, *x.shape[3:])


def linear_attention_chunked_ref(fq, fk, v, log_decay=None, initial_state: State | None = None, chunk_size: int = 64):
    """Chunkwise form: scores within chunks of ``chunk_size``, a running state across them.

    For a chunk starting after state ``(S, z)`` with ``b_p = a_s + ... + a_p`` (cumulated inside the chunk)::

        num_p = e^{b_p} φ(q_p) S + Σ_{s<=j<=p} e^{b_p - b_j} (φ(q_p)·φ(k_j)) v_j
        S'    = e^{b_last} S + Σ_j e^{b_last - b_j} φ(k_j) v_jᵀ          (z likewise, without v)

    Args:
        fq: ``[B, H, T, F]`` query features aligned with the keys, or None to compute the final state only.
        fk, v, log_decay, initial_state: as in ``linear_attention_parallel`` (``T`` positions).
        chunk_size: ``C``.

    Returns:
        ``num [B, H, T, E]``, ``den [B, H, T]`` (None when ``fq`` is None) and the final state ``(S, z)``.
    """
    batch, heads, length, features = fk.shape
    if initial_state is None:
        S, z = fk.new_zeros(batch, heads, features, v.shape[-1]), fk.new_zeros(batch, heads, features)
    else:
        S, z = initial_state
    chunks = -(-length // chunk_size)
    k_c, v_c = _blocks(fk, chunks, chunk_size), _blocks(v, chunks, chunk_size)
    b = None if log_decay is None else _blocks(log_decay, chunks, chunk_size).cumsum(-1)  # [B, H, N, C]
    k_end = k_c if b is None else k_c * (b[..., -1:] - b).exp()[..., None]  # decayed to the chunk's end
    chunk_dS, chunk_dz = k_end.transpose(-1, -2) @ v_c, k_end.sum(-2)  # [B, H, N, F, E], [B, H, N, F]
    entering = []
    for n in range(chunks):
        entering.append((S, z))
        if b is not None:
            through = b[:, :, n, -1].exp()
            S, z = S * through[..., None, None], z * through[..., None]
        S, z = S + chunk_dS[:, :, n], z + chunk_dz[:, :, n]
    if fq is None:
        return None, None, (S, z)
    q_c = _blocks(fq, chunks, chunk_size)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=fk.device).tril()
    scores = q_c @ k_c.transpose(-1, -2)  # [B, H, N, C, C]
    if b is None:
        scores, q_start = scores.masked_fill(~causal, 0.0), q_c
    else:
        gap = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf"))
        scores, q_start = scores * gap.exp(), q_c * b.exp()[..., None]
    S_in = torch.stack([s for s, _ in entering], dim=2)
    z_in = torch.stack([z for _, z in entering], dim=2)
    num = scores @ v_c + q_start @ S_in
    den = scores.sum(-1) + (q_start * z_in[..., None, :]).sum(-1)
    num = num.reshape(batch, heads, chunks * chunk_size, -1)[:, :, :length]
    den = den.reshape(batch, heads, chunks * chunk_size)[:, :, :length]
    return num, den, (S, z)
