"""Plain-PyTorch reference of ``lce.kernels.attention``: the spec's equations with every score materialised.

For query ``i`` (head ``h``, KV head ``h // (H / HKV)``) and key ``j`` at absolute positions ``q_pos``, ``k_pos``:

- log-n (Chiang & Cholak 2022, arXiv:2202.12172): ``q_i <- max(1, ln(i + 1) / ln(L)) q_i`` (positions below 0
  count as 0, multiplier 1);
- logits: without segments ``scale * q_i . k_j`` (q and k arrive rotated, or carry no rotation); with segments, the
  last segment selecting ``(i, j)`` gives ``scale * R(q_map(i)) q_i . R(k_map(j)) k_j`` with ``R`` the RoPE rotation
  (Su et al., arXiv:2104.09864, eq. 34: pair ``d`` turned by ``position * inv_freq[d]``, cos and sin times
  ``attention_scaling``, dims past ``2 * len(inv_freq)`` unrotated); this is how DCA (arXiv:2402.17463 §3),
  Self-Extend (arXiv:2401.01325 §3), ReRoPE and StreamingLLM's pos-shift (arXiv:2309.17453 §3.2) remap positions;
- ALiBi (Press et al. 2022, arXiv:2108.12409 §3): ``logit -= m_h * (i - j)``;
- visible iff ``j <= i``, some segment selects the pair (when there are segments), ``i - j < window`` or
  ``0 <= j < sink_tokens`` (when there is a window), and ``block_mask[i // bs, j // bs]`` (when there is one);
- one softmax over the visible keys (fp32), rows with none output 0.

The matmuls run in the inputs' dtype and the softmax in fp32 or wider (as lce's eager attention references), so
with fp32 inputs this is the fp32 reference and with fp16/bf16 inputs it is "PyTorch in the same dtype" of the
flash-attention tolerance rule. Memory is ``O(B * H * Tq * Tk)``: a reference for tests and the ``ref`` backend, not
for long inputs.
"""

from __future__ import annotations

import math

import torch

from lce.kernels.attention.spec import AttentionSpec
from lce.kernels.rope.reference import rope_reference


def logn_multiplier(q_pos: torch.Tensor, length: int) -> torch.Tensor:
    """``max(1, ln(i + 1) / ln(L))`` per query, fp32 ``[B, Tq]`` (positions below 0 give 1)."""
    return (torch.log(q_pos.clamp(min=0).to(torch.float32) + 1) / math.log(length)).clamp(min=1.0)


def visible_pairs(spec: AttentionSpec, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """bool ``[B, Tq, Tk]``: causal pairs the window, sinks and block mask allow (segments are applied separately)."""
    i, j = q_pos[:, :, None], k_pos[:, None, :]
    ok = j <= i
    if spec.window is not None:
        ok = ok & ((i - j < spec.window) | ((j >= 0) & (j < spec.sink_tokens)))
    if spec.block_mask is not None:
        n_qb, n_kb = spec.block_mask.shape
        qb, kb = torch.div(i, spec.block_size, rounding_mode="floor"), torch.div(j, spec.block_size,
                                                                                 rounding_mode="floor")
        inside = (qb >= 0) & (qb < n_qb) & (kb >= 0) & (kb < n_kb)
        ok = ok & inside & spec.block_mask.to(q_pos.device)[qb.clamp(0, n_qb - 1), kb.clamp(0, n_kb - 1)]
    return ok


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
                        q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Attention following ``spec`` with the ``[B, H, Tq, Tk]`` scores materialised.

    Args:
        q: ``[B, H, Tq, D]`` queries (unrotated when ``spec.segments``).
        k: ``[B, HKV, Tk, D]`` keys; v: ``[B, HKV, Tk, Dv]`` values (``H`` a multiple of ``HKV``).
        spec: what to compute.
        q_pos, k_pos: ``[B, Tq]``, ``[B, Tk]`` integer absolute positions.

    Returns:
        ``[B, Tq, H, Dv]`` in ``q.dtype``; rows with no visible key are 0 (their gradients too).
    """
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if spec.logn_length is not None:
        q = q * logn_multiplier(q_pos, spec.logn_length)[:, None, :, None].to(q.dtype)
    score_dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 softmax (fp64 stays fp64 for exact checks)
    visible = visible_pairs(spec, q_pos, k_pos)[:, None]  # [B, 1, Tq, Tk]
    if not spec.segments:
        scores = torch.matmul(q, k.transpose(-1, -2)).to(score_dtype) * spec.scale
    else:
        scores = torch.zeros(*q.shape[:3], k.shape[2], dtype=score_dtype, device=q.device)
        selected = torch.zeros_like(visible)
        rot = spec.rotary
        for segment in spec.segments:
            q_rot = rope_reference(q, segment.q_map(q_pos), rot.inv_freq, rot.attention_scaling, rot.style)
            k_rot = rope_reference(k, segment.k_map(k_pos), rot.inv_freq, rot.attention_scaling, rot.style)
            chosen = segment.select(q_pos[:, :, None], k_pos[:, None, :])[:, None]
            logits = torch.matmul(q_rot, k_rot.transpose(-1, -2)).to(score_dtype) * spec.scale
            scores = torch.where(chosen, logits, scores)
            selected = selected | chosen
        visible = visible & selected
    if spec.alibi_slopes is not None:
        distance = (q_pos[:, :, None] - k_pos[:, None, :]).to(score_dtype)[:, None]
        scores = scores - spec.alibi_slopes.to(q.device, score_dtype)[None, :, None, None] * distance
    # A row with no visible key keeps finite scores and is zeroed after the softmax: an all -inf row would give NaN
    # probabilities, and NaN gradients through the backward matmuls.
    alive = visible.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~visible & alive, float("-inf")), dim=-1) * alive
    return torch.matmul(probs.to(v.dtype), v).transpose(1, 2)

