"""Queries and keys rotated once per position map (and queries log-n scaled) before the attention kernels run, and the
gradients turned back.

A segment's logit is ``R(a_i) q_i . R(b_j) k_j`` (``spec.Segment``; RoPE, Su et al., arXiv:2104.09864, eq. 34). Rotating
inside the kernels would recompute sines and cosines for every (query tile, key tile) pair; rotating here costs one
pass over q per distinct query map and over k per distinct key map (DCA: three and one; Self-Extend, ReRoPE, sinks: two
and two), with the RoPE kernel (``lce.kernels.rope``) on CUDA. The kernels then compute each segment's logits as one
dot product of ready tiles.

Backward: ``d(R q) = dq_rot`` gives ``dq = R^T dq_rot = R(-a) dq_rot`` (cos and sin carry ``attention_scaling``, so the
transpose is the same scaling at the negated angle); segments sharing a map are summed first, so each distinct map
costs one rotation.
"""

from __future__ import annotations

import torch

from lce.kernels.attention.reference import logn_multiplier
from lce.kernels.attention.spec import AttentionSpec
from lce.kernels.attention.triton_common import distinct_maps
from lce.kernels.rope.function import rope


def _rope_backend(x: torch.Tensor) -> str:
    # The fused RoPE kernel on a GPU; elsewhere the reference (the attention kernels only run on CPU in Triton's
    # interpreter, for tests, where the reference is both exact and much faster).
    return "triton" if x.is_cuda else "ref"


def rotated(x: torch.Tensor, pos: torch.Tensor, maps: tuple, spec: AttentionSpec) -> torch.Tensor:
    """``x [B, H, T, D]`` rotated at ``m(pos)`` for each map ``m``: ``[len(maps), B, H, T, D]`` in ``x.dtype``."""
    rot = spec.rotary
    out = torch.empty((len(maps), *x.shape), dtype=x.dtype, device=x.device)
    for slot, position_map in enumerate(maps):
        out[slot] = rope(x, position_map(pos), rot.inv_freq.to(x.device), rot.attention_scaling, rot.style,
                         _rope_backend(x))
    return out


def rotated_inputs(q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, q_pos: torch.Tensor,
                   k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [NQ, B, H, Tq, D]`` and ``k [NK, B, HKV, Tk, D]``, one slice per distinct position map of the segments;
    without segments ``q[None]`` and ``k[None]`` (views, no copy). Queries are log-n scaled first (as the reference
    does, in their dtype), so no kernel scales query tiles in its loop."""
    if spec.logn_length is not None:
        q = q * logn_multiplier(q_pos, spec.logn_length)[:, None, :, None].to(q.dtype)
    if not spec.segments:
        return q[None], k[None]
    q_maps, k_maps, _, _ = distinct_maps(spec.segments)
    return rotated(q, q_pos, q_maps, spec), rotated(k, k_pos, k_maps, spec)


def unrotated_gradient(grad_rot: torch.Tensor, pos: torch.Tensor, maps: tuple, index: list[int],
                       spec: AttentionSpec, dtype: torch.dtype) -> torch.Tensor:
    """``sum_s R(-m_s(pos)) grad_rot[s]`` in fp32, returned in ``dtype``.

    Args:
        grad_rot: ``[N_SEG, B, H, T, D]`` fp32, the gradient of each segment's rotated tensor.
        pos: ``[B, T]`` positions; maps: the distinct position maps; index: each segment's map.
    """
    rot = spec.rotary
    total = None
    for slot, position_map in enumerate(maps):
        parts = [s for s, m in enumerate(index) if m == slot]
        summed = grad_rot[parts].sum(0) if len(parts) > 1 else grad_rot[parts[0]]
        back = rope(summed, -position_map(pos), rot.inv_freq.to(summed.device), rot.attention_scaling, rot.style,
                    _rope_backend(summed))
        total = back if total is None else total.add_(back)
    return total.to(dtype)
