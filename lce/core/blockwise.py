"""Block-wise masked attention: how lce computes a sparse attention variant's pattern without ``[T, T]`` tensors.

A sparse variant (sliding window, Longformer's local + global, BigBird's block-sparse, LongLoRA's S²-Attn, dilated)
says which (query, key) pairs may attend through a ``lce.core.plan.Restriction``: a predicate on absolute
positions plus a block map (the key ranges a block of queries can reach). ``blockwise_attention`` scores one block
of queries at a time against the key columns the block map and causality leave (a view of the keys when they are
contiguous), and applies the exact predicate inside the block. Neither a ``[T, T]`` mask nor ``[T, T]`` scores ever
exist; under autograd every block is recomputed in the backward pass (activation checkpointing per block, as in
``lce.core.segments``), so training keeps ``O(T)`` between forward and backward. A sliding window of ``W`` costs
``O(T * (W + block))`` time and memory, forward and backward.

It runs when the position encoding leaves attention to the model (rope, pi, ntk, yarn, llama3: queries and keys
arrive rotated). Encodings that compute attention themselves honour the same restriction through their
``visible=`` argument, with ``key_columns`` and ``allowed_pairs`` from this module (``segmented_attention`` for DCA,
ReRoPE, ...; ``alibi_attention``). ``masked_attention_eager`` is the readable reference with the mask materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lce.core.plan import KeyRanges, Restriction

Columns = slice | torch.Tensor


def merge_ranges(ranges: KeyRanges) -> KeyRanges:
    """Sorted, non-overlapping, non-empty ranges covering the same positions."""
    merged: KeyRanges = []
    for start, stop in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def key_columns(visible: Restriction | None, q_pos: torch.Tensor, k_pos: torch.Tensor) -> Columns:
    """The key columns some query of a block may see: at or before its last position, inside the block map.

    Args:
        visible: the restriction (its ``key_ranges``), or None for causality alone.
        q_pos: ``[B, b]`` positions of the block's queries.
        k_pos: ``[B, Tk]`` key positions.

    Returns:
        A slice when the columns are contiguous (indexing with it is a view: nothing is copied), else a ``[n]`` index
        tensor. The batch shares the columns (their union), so rows offset by padding are covered too.
    """
    q_hi = int(q_pos.max())
    maybe = k_pos <= q_hi
    ranges = visible.key_ranges(int(q_pos.min()), q_hi) if visible is not None else None
    if ranges is not None:
        reach = torch.zeros_like(maybe)
        for start, stop in merge_ranges(ranges):
            reach |= (k_pos >= start) & (k_pos < stop)
        maybe &= reach
    columns = maybe.any(dim=0).nonzero().flatten()
    if columns.numel() == 0:
        return slice(0, 0)
    first, last = int(columns[0]), int(columns[-1])
    if last - first + 1 == columns.numel():
        return slice(first, last + 1)
    return columns


def allowed_pairs(q_pos: torch.Tensor, k_pos: torch.Tensor, attention_mask: torch.Tensor | None,
                  visible: Restriction | None) -> torch.Tensor:
    """bool ``[B, 1, b, n]`` (``[B, H, b, n]`` for per-head patterns): causal, allowed by the boolean mask
    ``[B, 1, b, n]`` (True = may attend) if any, and visible under the restriction if any."""
    i, j = q_pos[:, :, None], k_pos[:, None, :]
    ok = (j <= i)[:, None]
    if visible is not None:
        pattern = visible(i, j)
        ok = ok & (pattern if pattern.dim() == 4 else pattern[:, None])
    if attention_mask is not None:
        ok = ok & attention_mask
    return ok


def masked_attention_eager(query, key, value, q_pos, k_pos, scaling, attention_mask=None, visible=None,
                           softcap=None, dropout=0.0):
    """Reference: causal softmax attention with the whole ``[B, H, Tq, Tk]`` mask and scores materialised.

    Args:
        query: ``[B, H, Tq, D]``; key, value: ``[B, HKV, Tk, D]`` (query head ``h`` uses KV head ``h // (H/HKV)``).
        q_pos, k_pos: ``[B, Tq]``, ``[B, Tk]`` absolute positions.
        scaling: softmax scale.
        attention_mask: ``[B, 1, Tq, Tk]`` boolean (True = may attend), or None.
        visible: a ``Restriction`` (or any predicate of the same signature), or None.
        softcap: soft-cap logits to ``softcap * tanh(logits / softcap)`` (Gemma 2), or None.
        dropout: attention-probability dropout.

    Returns:
        ``[B, Tq, H, D]`` in ``query.dtype``; rows with no visible key are 0.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    score_dtype = torch.promote_types(query.dtype, torch.float32)
    scores = torch.matmul(query, key.transpose(-1, -2)).to(score_dtype) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed_pairs(q_pos, k_pos, attention_mask, visible), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if dropout > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    return torch.matmul(probs.to(value.dtype), value).transpose(1, 2)


def _block(query, key, value, q_pos, k_pos, mask, columns, visible, scaling, softcap, dropout):
    """One query block over its key columns: ``query [B, H, b, D]``, ``key/value [B, HKV, Tk, D]`` -> ``[B, H, b, D]``.

    Without soft-capping: one fused SDPA call with this block's boolean mask (KV heads broadcast by ``enable_gqa``),
    which keeps neither scores nor probabilities. With soft-capping (Gemma 2), which SDPA cannot apply, the scores are
    formed explicitly.
    """
    key, value, k_pos = key[:, :, columns], value[:, :, columns], k_pos[:, columns]
    if mask is not None:
        mask = mask[..., columns]
    ok = allowed_pairs(q_pos, k_pos, mask, visible)  # [B, 1 or H, b, n]
    # A row with no visible key (a left-pad query) attends to everything and is zeroed after: an all-masked row gives
    # NaN probabilities, whose gradients leak NaN into every key through the backward matmul.
    alive = ok.any(dim=-1, keepdim=True)
    ok = ok | ~alive
    if softcap is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=ok, dropout_p=dropout, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
    else:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        score_dtype = torch.promote_types(query.dtype, torch.float32)
        scores = torch.matmul(query, key.transpose(-1, -2)).to(score_dtype) * scaling
        scores = torch.tanh(scores / softcap) * softcap
        probs = torch.softmax(scores.masked_fill(~ok, float("-inf")), dim=-1)
        if dropout > 0:
            probs = torch.nn.functional.dropout(probs, p=dropout)
        out = torch.matmul(probs.to(value.dtype), value)
    return out if bool(alive.all()) else out * alive


def blockwise_attention(query, key, value, q_pos, k_pos, scaling, attention_mask=None, visible=None,
                        block_size: int = 128, softcap=None, dropout=0.0):
    """Block-wise masked attention: same arguments and result as ``masked_attention_eager``.

    Each block of ``block_size`` queries scores only the key columns ``key_columns`` leaves (KV heads are
    broadcast, not copied per query head); memory is ``O(B * H * block_size * n)`` for ``n`` such columns. With more
    than one block and gradients required, blocks are recomputed in the backward pass instead of keeping their
    probabilities.
    """
    tq = query.shape[2]
    recompute = tq > block_size and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    outs = []
    for start in range(0, tq, block_size):
        stop = min(start + block_size, tq)
        i = q_pos[:, start:stop]
        columns = key_columns(visible, i, k_pos)
        if isinstance(columns, slice) and columns.stop == columns.start:  # nothing visible: zero rows
            outs.append(query.new_zeros(*query.shape[:2], stop - start, value.shape[-1]))
            continue
        mask = attention_mask[:, :, start:stop] if attention_mask is not None else None
        args = (query[:, :, start:stop], key, value, i, k_pos, mask, columns, visible, scaling, softcap, dropout)
        outs.append(checkpoint(_block, *args, use_reentrant=False) if recompute else _block(*args))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2)
