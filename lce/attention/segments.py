"""Attention over position-remapped segments: the reference for DCA, Self-Extend, ReRoPE and StreamingLLM.

These methods keep RoPE but change the relative position seen by each (query, key) pair. Each one is a small set of
segments; a segment rotates queries at ``q_map(i)`` and keys at ``k_map(j)`` (absolute positions ``i``, ``j``) and
owns the pairs its ``select(i, j)`` picks, so its logits are ``R(q_map(i)) q_i . R(k_map(j)) k_j``, which depend on
``q_map(i) - k_map(j)`` only. Scores of all segments are merged *before* one softmax (exact, unlike merging
separately normalised attention outputs with detached weights).

``segmented_attention`` materialises ``[B, H, block, Tk]`` scores one query block at a time, so memory grows with
``T * block`` rather than ``T^2`` (in training too: blocks are recomputed in the backward pass); with
``block >= Tq`` it is the plain eager reference. Keys are rotated once per segment (``O(T)`` memory).

Without autograd on CPU (evaluation) each block runs one fused SDPA call per segment over the key columns that segment
selects, merged by log-sum-exp weights (``_block_merged``): the same softmax, without scores in memory and without
scoring a pair once per segment. Under autograd the segment logits are merged before one explicit softmax
(``_block``), whose gradient is exact; on CUDA lce's fused Triton kernel (``lce.kernels.attention``) does both.

A sparse attention variant's restriction (``visible=``, ``lce.attention.plan.Restriction``) hides further pairs, and
each query block then scores only the key columns the restriction's block map and causality leave
(``lce.attention.blockwise.key_columns``): DCA or ReRoPE under a sliding window of ``W`` cost ``O(T * (W + block))``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

from lce.attention.blockwise import allowed_pairs, key_columns
from lce.errors import LceError

if TYPE_CHECKING:  # annotations only: importing lce.posenc here would import every method (a cycle)
    from lce.attention.plan import Restriction
    from lce.hf.patch import PatchTarget
    from lce.posenc.rotation import Rotation

PositionMap = Callable[[torch.Tensor], torch.Tensor]
PairSelect = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Segment:
    """One way of rotating a (query, key) pair.

    Attributes:
        q_map: absolute query positions ``[B, Tq]`` -> rotation positions (same shape).
        k_map: absolute key positions ``[B, Tk]`` -> rotation positions.
        select: ``(i [B, Tq, 1], j [B, 1, Tk]) -> bool [B, Tq, Tk]``: the causal pairs this segment scores.
            Segments must not overlap; a causal pair no segment selects is masked out.
    """

    q_map: PositionMap
    k_map: PositionMap
    select: PairSelect


def identity(positions: torch.Tensor) -> torch.Tensor:
    return positions


def fused_segments(segments: tuple, rotation: Rotation, window: int | None = None, sink_tokens: int = 0):
    """A segment method as data for lce's fused kernel (``lce.attention.plan.FusedAttention``): its segments written
    as ``lce.kernels.attention.spec.Segment`` (``lce.kernels.attention.segments``, tested equal to the callables the
    method's ``segmented_attention`` reference uses) and the layer's rotation. Without rotation every segment gives
    the same logits, so only the pairs they select matter: all causal pairs for DCA, Self-Extend and ReRoPE, the
    window and sinks (passed as ``window``/``sink_tokens``) for StreamingLLM."""
    from lce.attention.plan import FusedAttention
    from lce.kernels.attention import Rotary

    if rotation.rotary_dim == 0:  # a layer that does not rotate (SmolLM3's NoPE layers): every segment scores alike
        return FusedAttention(window=window, sink_tokens=sink_tokens)
    return FusedAttention(segments=tuple(segments), rotary=Rotary.from_rotation(rotation), window=window,
                          sink_tokens=sink_tokens)


def use_segment_method(target: PatchTarget, method: str, attend: Callable[..., torch.Tensor],
                       fused_for: Callable[[Rotation], object], takes_visible: bool = True) -> None:
    """Patch every layer of ``target`` with a segment method, each layer rotating with its own rotation (Gemma3's
    per-layer-type frequencies, SmolLM3's NoPE layers).

    Args:
        method: the position encoding's name (errors, the attention function's name).
        attend: ``(rotation, query, key, value, q_pos, k_pos, scaling, attention_mask, visible, softcap) -> [B, Tq, H,
            D]``, the method's attention on one layer (``visible``: a restriction or None; ``softcap``: the model's
            attention-logit soft-cap or None).
        fused_for: a layer's rotation -> its ``FusedAttention`` (the same method as data for the fused kernel).
        takes_visible: whether ``attend`` honours an attention variant's restriction; if not, combining the method
            with a sparse variant is refused when the model is patched.
    """
    rotations = target.layer_rotations_in_attention(method)

    def kernel_for(layer_index, module):
        rotation = rotations[layer_index]

        def kernel(module, query, key, value, attention_mask, scaling, dropout, q_pos, k_pos, visible=None,
                   **kwargs):
            if dropout:
                raise LceError(f"posenc={method} has no attention dropout; got dropout={dropout} "
                               "(set attention_dropout=0)")
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            return attend(rotation, query, key, value, q_pos, k_pos, scale, attention_mask, visible,
                          kwargs.get("softcap")), None

        if takes_visible:
            return kernel

        def kernel_without_visible(module, query, key, value, attention_mask, scaling, dropout, q_pos, k_pos,
                                   **kwargs):
            return kernel(module, query, key, value, attention_mask, scaling, dropout, q_pos, k_pos, **kwargs)

        return kernel_without_visible

    target.use_kernel(method, kernel_for, handles={"softcap"},
                      fused_for_layer=lambda layer_index, module: fused_for(rotations[layer_index]))


def segmented_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: list[Segment],
    rotation: Rotation,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    block_size: int = 1024,
    visible: Restriction | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention whose logits come from the segment owning each pair.

    Args:
        query: ``[B, H, Tq, D]`` unrotated queries (already scaled per position if log-n applies).
        key, value: ``[B, HKV, Tk, D]`` unrotated keys and values (``H`` a multiple of ``HKV``).
        segments: the method's segments.
        rotation: the model's rotary embedding.
        q_pos, k_pos: ``[B, Tq]``, ``[B, Tk]`` absolute positions.
        scaling: the softmax scale (``1/sqrt(D)``).
        attention_mask: ``[B, 1, Tq, Tk]`` boolean (True = may attend), or None; combined with causality.
        block_size: query rows scored at once.
        visible: a sparse variant's restriction of the pairs that may attend, or None.
        softcap: soft-cap every logit to ``softcap * tanh(logit / softcap)`` before the softmax (Gemma 2), or None.

    Returns:
        ``[B, Tq, H, D]`` in ``query.dtype``; rows with no visible key are 0.
    """
    heads, tq = query.shape[1], query.shape[2]
    groups = heads // key.shape[1]
    rotated: dict[int, torch.Tensor] = {}  # segments sharing a key map (all three of DCA's) share its rotated keys
    for seg in segments:
        if id(seg.k_map) not in rotated:
            rotated[id(seg.k_map)] = rotation.apply(key, seg.k_map(k_pos)).repeat_interleave(groups, dim=1)
    keys = [rotated[id(seg.k_map)] for seg in segments]
    values = value.repeat_interleave(groups, dim=1)
    # Under autograd each block is recomputed in the backward pass, so training keeps one block of scores, not T^2.
    recompute = torch.is_grad_enabled() and tq > block_size
    blocks = []
    for start in range(0, tq, block_size):
        stop = min(start + block_size, tq)
        mask = attention_mask[:, :, start:stop, :] if attention_mask is not None else None
        # Without a restriction every key column is scored, as before restrictions existed (same summation order).
        columns = key_columns(visible, q_pos[:, start:stop], k_pos) if visible is not None else slice(None)
        args = (query[:, :, start:stop], q_pos[:, start:stop], k_pos, keys, values, mask, segments, rotation, scaling,
                columns, visible)
        if torch.is_grad_enabled() or query.device.type != "cpu" or softcap is not None:
            args += (softcap,)
            blocks.append(checkpoint(_block, *args, use_reentrant=False) if recompute else _block(*args))
        else:
            blocks.append(_block_merged(*args))
    return torch.cat(blocks, dim=2).transpose(1, 2)


def _block(query, q_pos, k_pos, keys, values, mask, segments, rotation, scaling, columns, visible,
           softcap=None) -> torch.Tensor:
    """Attention of one query block ``[B, H, Tb, D]`` over its key columns: segment logits merged, one softmax."""
    score_dtype = torch.promote_types(query.dtype, torch.float32)  # softmax in at least fp32
    k_pos, keys, values = k_pos[:, columns], [k[:, :, columns] for k in keys], values[:, :, columns]
    if mask is not None:
        mask = mask[..., columns]
    i, j = q_pos[:, :, None], k_pos[:, None, :]
    allowed = allowed_pairs(q_pos, k_pos, mask, visible)  # [B, 1 or H, Tb, Tk]
    scores = torch.full((*query.shape[:3], k_pos.shape[1]), float("-inf"), device=query.device, dtype=score_dtype)
    for seg, k_rot in zip(segments, keys):
        q_rot = rotation.apply(query, seg.q_map(q_pos))
        chosen = seg.select(i, j)[:, None] & allowed
        logits = torch.matmul(q_rot, k_rot.transpose(-1, -2)).to(score_dtype) * scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        scores = torch.where(chosen, logits, scores)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows (left padding) attend to nothing
    return torch.matmul(probs.to(values.dtype), values)


def _pairs_argument(chosen: torch.Tensor, dtype: torch.dtype) -> tuple[bool, torch.Tensor | None]:
    """How the fused kernel learns which pairs of a span it scores, as ``(is_causal, bias)``: nothing for a span the
    segment covers entirely, ``is_causal`` for a square causal one (both several times faster than a bias; every span
    of DCA's chunk-aligned blocks is one of the two), else a ``[..., b, n]`` bias of 0 and ``-inf``."""
    if bool(chosen.all()):
        return False, None
    rows, cols = chosen.shape[-2:]
    if rows == cols and bool((chosen == torch.ones(rows, cols, dtype=torch.bool, device=chosen.device).tril()).all()):
        return True, None
    return False, torch.zeros(chosen.shape, dtype=dtype, device=chosen.device).masked_fill_(~chosen, float("-inf"))


def _block_merged(query, q_pos, k_pos, keys, values, mask, segments, rotation, scaling, columns, visible):
    """``_block`` without autograd on CPU: per segment one fused SDPA call (PyTorch's CPU flash kernel, which returns
    the log-sum-exp) over the key columns that segment selects, merged by log-sum-exp weights. That is the same
    softmax (``softmax`` over a union of disjoint sets = LSE-weighted sum of the per-set softmaxes), computed without
    scores in memory and without scoring a pair once per segment; the weights would need the LSE's gradient, hence
    inference only (under autograd ``_block`` runs)."""
    k_pos, keys, values = k_pos[:, columns], [k[:, :, columns] for k in keys], values[:, :, columns]
    if mask is not None:
        mask = mask[..., columns]
    i, j = q_pos[:, :, None], k_pos[:, None, :]
    allowed = allowed_pairs(q_pos, k_pos, mask, visible)  # [B, 1 or H, Tb, Tk]
    outs, lses = [], []
    for seg, k_rot in zip(segments, keys):
        chosen = seg.select(i, j)[:, None] & allowed
        used = chosen.flatten(0, 2).any(dim=0).nonzero().flatten()
        if used.numel() == 0:
            continue
        cols = slice(int(used[0]), int(used[-1]) + 1)  # a contiguous span holding every selected column
        chosen = chosen[..., cols]
        q_rot = rotation.apply(query, seg.q_map(q_pos))
        causal, bias = _pairs_argument(chosen, query.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_rot, k_rot[:, :, cols], values[:, :, cols], 0.0, causal, attn_mask=bias, scale=scaling)
        # The kernel reports lse = 0 and output 0 for a row with no selected key: mark such rows -inf (weight 0).
        lses.append(lse.float().masked_fill(~chosen.any(dim=-1).expand_as(lse), float("-inf")))
        outs.append(out)
    if not outs:
        return query.new_zeros(*query.shape[:3], values.shape[-1])
    lse = torch.stack(lses)  # [S, B, H, Tb]
    top = lse.amax(dim=0)
    weights = torch.exp(lse - torch.where(torch.isfinite(top), top, 0.0))  # rows nothing selects: all 0
    total = weights.sum(dim=0).clamp_min(torch.finfo(torch.float32).tiny)
    merged = sum(w[..., None] * o.float() for w, o in zip(weights, outs)) / total[..., None]
    return merged.to(query.dtype)
