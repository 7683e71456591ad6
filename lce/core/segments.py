"""Attention over position-remapped segments: the engine of DCA, Self-Extend, ReRoPE and StreamingLLM.

These methods keep RoPE but change the relative position seen by each (query, key) pair. Each one is a small set of
segments, written once as data in the method's module (``lce.kernels.attention.spec.Segment``; the Triton kernel
reads the same tuples): a segment rotates queries at ``q_map(i)`` and keys at ``k_map(j)`` (absolute positions
``i``, ``j``) and owns the pairs its ``select(i, j)`` picks, so its logits are ``R(q_map(i)) q_i . R(k_map(j)) k_j``,
which depend on ``q_map(i) - k_map(j)`` only. Scores of all segments are merged *before* one softmax (exact, unlike
merging separately normalised attention outputs with detached weights).

A patched layer is a ``SegmentLayer``: the segments, the layer's rotation and what else the method fixes (DCA's query
scale, StreamingLLM's window), computed by ``segmented_attention`` (PyTorch), or by the fused Triton kernel from the
same data (``SegmentLayer.fused``).

``segmented_attention`` materialises ``[B, H, block, Tk]`` scores one query block at a time, so memory grows with
``T * block`` rather than ``T^2`` (in training too: blocks are recomputed in the backward pass); with
``block >= Tq`` it is the plain eager reference. Keys are rotated once per segment (``O(T)`` memory). Without autograd
on CPU (evaluation) each block runs fused SDPA calls per segment over the key columns that segment selects, merged by
log-sum-exp weights: the same softmax, without scores in memory and without scoring a pair once per segment; with
consecutive positions (an unpadded batch) ``lce.core.staircase`` does the same without any ``[Tq, Tk]`` tensor.
Under autograd the segment logits are merged before one explicit softmax (``_block``), whose gradient is exact.

A sparse attention variant's restriction (``visible=``, ``lce.core.plan.Restriction``) hides further pairs, and
each query block then scores only the key columns the restriction's block map and causality leave
(``lce.core.blockwise.key_columns``): DCA or ReRoPE under a sliding window of ``W`` cost ``O(T * (W + block))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lce.core.blockwise import allowed_pairs, key_columns
from lce.core.plan import RESTRICTION, SOFTCAP, FusedAttention, LayerAttention, Restriction
from lce.core.staircase import merge_by_lse, staircase_applies, staircase_attention
from lce.errors import LceError
from lce.kernels.attention import spec
from lce.kernels.rope import Rotation


@dataclass(frozen=True, eq=False)
class SegmentLayer(LayerAttention):
    """One layer's attention under a segment method.

    Attributes:
        method: the position encoding's name (errors).
        segments: the method's segments (``spec.Segment``).
        rotation: the layer's rotary embedding (``Rotation``); None until the layer's rotation is known.
        query_scale: ``q_pos [B, Tq] -> [B, Tq]`` multipliers applied to the unrotated queries first (DCA's logit
            temperature), or None.
        block_size: query rows scored at once.
        window, sink_tokens: a pattern the method imposes itself (StreamingLLM: the ``window`` most recent keys and
            the first ``sink_tokens``); each query block then reads only the keys the pattern can reach.
        handles: ``SOFTCAP`` and, unless the method imposes its own pattern, ``RESTRICTION``.
    """

    method: str
    segments: tuple[spec.Segment, ...]
    rotation: Rotation | None = None
    query_scale: Callable[[torch.Tensor], torch.Tensor] | None = None
    block_size: int = 1024
    window: int | None = None
    sink_tokens: int = 0
    handles: frozenset[str] = frozenset({SOFTCAP, RESTRICTION})

    def __call__(self, module: nn.Module, query, key, value, attention_mask, scaling, dropout, *, q_pos, k_pos,
                 visible: Restriction | None = None, softcap: float | None = None, **kwargs):
        if dropout:
            raise LceError(f"posenc={self.method} has no attention dropout; got dropout={dropout} "
                           "(set attention_dropout=0)")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return self.attend(query, key, value, q_pos, k_pos, scale, attention_mask, visible, softcap), None

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_pos: torch.Tensor,
               k_pos: torch.Tensor, scaling: float, attention_mask: torch.Tensor | None = None,
               visible: Restriction | None = None, softcap: float | None = None) -> torch.Tensor:
        """The layer on unrotated ``query [B, H, Tq, D]``, ``key/value [B, HKV, Tk, D]`` at positions ``q_pos [B, Tq]``,
        ``k_pos [B, Tk]``; ``attention_mask [B, 1, Tq, Tk]`` boolean or None. Returns ``[B, Tq, H, D]``."""
        if self.query_scale is not None:
            query = query * self.query_scale(q_pos)[:, None, :, None].to(query.dtype)
        if self.window is None:
            return segmented_attention(query, key, value, self.segments, self.rotation, q_pos, k_pos, scaling,
                                       attention_mask, self.block_size, visible, softcap)
        return _windowed_attention(self, query, key, value, q_pos, k_pos, scaling, attention_mask, softcap)

    def fused(self) -> FusedAttention:
        """The same layer for lce's fused kernel. Without rotation every segment gives the same logits, so only the
        pairs they select matter: all causal pairs for DCA, Self-Extend and ReRoPE, the window and sinks for
        StreamingLLM (passed as the kernel's pattern, which also lets it skip the key tiles no segment selects)."""
        if self.rotation.rotary_dim == 0:  # a layer that does not rotate (SmolLM3's NoPE layers)
            return FusedAttention(window=self.window, sink_tokens=self.sink_tokens, query_scale=self.query_scale)
        return FusedAttention(segments=self.segments, rotary=self.rotation, window=self.window,
                              sink_tokens=self.sink_tokens, query_scale=self.query_scale)


def _windowed_attention(layer: SegmentLayer, query, key, value, q_pos, k_pos, scaling, attention_mask,
                        softcap) -> torch.Tensor:
    """``segmented_attention`` of a layer with its own window: each block of queries is scored against the key
    columns some query of the block may see (the sinks and the union of the block's windows) only; the others would
    get probability 0 anyway. Returns ``[B, Tq, H, D]``."""
    segments, block_size = layer.segments, layer.block_size
    if staircase_applies(segments, query, q_pos, k_pos, attention_mask, None, softcap):
        # Inference on CPU: the staircase path reads only the sinks and each block's window, without gathering keys.
        return segmented_attention(query, key, value, segments, layer.rotation, q_pos, k_pos, scaling)
    outs = []
    for start in range(0, query.shape[2], block_size):
        stop = min(start + block_size, query.shape[2])
        i = q_pos[:, start:stop]
        mask = attention_mask[:, :, start:stop] if attention_mask is not None else None
        maybe = ((k_pos < layer.sink_tokens) | (k_pos > i.min(-1, keepdim=True).values - layer.window)) & (
            k_pos <= i.max(-1, keepdim=True).values)
        columns = maybe.any(dim=0).nonzero().squeeze(-1)
        k, v, kp = key, value, k_pos
        if columns.numel() < k_pos.shape[1]:
            k, v, kp = key[:, :, columns], value[:, :, columns], k_pos[:, columns]
            mask = mask[..., columns] if mask is not None else None
        outs.append(segmented_attention(query[:, :, start:stop], k, v, segments, layer.rotation, i, kp, scaling, mask,
                                        block_size=block_size, softcap=softcap))
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


def segmented_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: Sequence[spec.Segment],
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
        segments: the method's segments (``spec.Segment``; a causal pair none selects is hidden).
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
    if staircase_applies(segments, query, q_pos, k_pos, attention_mask, visible, softcap):
        return staircase_attention(query, key, value, int(q_pos[0, 0]), int(k_pos[0, 0]), segments, rotation,
                                    scaling)
    rotated = {}  # segments sharing a key map (all three of DCA's) share its rotated keys
    for seg in segments:
        if seg.k_map not in rotated:
            rotated[seg.k_map] = rotation.apply(key, seg.k_map(k_pos)).repeat_interleave(groups, dim=1)
    keys = [rotated[seg.k_map] for seg in segments]
    values = value.repeat_interleave(groups, dim=1)
    # Under autograd each block is recomputed in the backward pass, so training keeps one block of scores, not T^2.
    recompute = torch.is_grad_enabled() and tq > block_size
    blocks = []
    for start in range(0, tq, block_size):
        stop = min(start + block_size, tq)
        mask = attention_mask[:, :, start:stop, :] if attention_mask is not None else None
        # Without a restriction every key column is scored (a slice, not an index: no copy of the keys).
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
    parts = []
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
        # The fused CPU attention reports lse = 0 and output 0 for a row with no selected key: such rows get -inf
        # (weight 0).
        parts.append((slice(0, None), out, lse.float().masked_fill(~chosen.any(dim=-1).expand_as(lse), float("-inf"))))
    return merge_by_lse(parts, query, values.shape[-1])
