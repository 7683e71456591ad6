"""Causal softmax attention restricted to selected key blocks: the readable reference and the chunked PyTorch form.

The keys are cut into blocks of ``block_size`` consecutive positions (block ``b`` holds keys ``b * block_size`` to
``(b + 1) * block_size - 1``; key ``j`` sits at position ``j``). Every query ``t`` comes with a list of selected blocks
``I_t`` (its row of ``block_index``) and attends, with one softmax, to the causal keys of those blocks::

    o_t = Σ_{j ∈ K_t} softmax_j(scale * q_t·k_j) v_j,      K_t = {j : j // block_size ∈ I_t, j <= pos_t}

This is MoBA's attention once its gate has chosen the blocks (Lu et al. 2025, arXiv:2502.13189, eq. 2-3: the selected
blocks' keys and values, the current block among them, causal inside it), NSA's selected-token branch (Yuan et al.
2025, arXiv:2502.11089, eq. 12 inside eq. 5) and Quest's attention over the chosen pages (Tang et al. 2024,
arXiv:2406.10774). Who chooses the blocks is the caller's business (``lce.attention.block_selection``).

Selections are per query head (``block_index`` has ``HQ`` heads: MoBA, Quest) or shared by the query heads of a GQA
group (``HKV`` heads: NSA, eq. 10, which lets a kernel load each selected block once for the whole group).

- ``selected_attention_reference``: the ``[Tq, Tk]`` mask and scores materialised; the ground truth.
- ``selected_attention_chunked``: key-block-major: each selected block's keys are read once and scored against the
  queries that chose it by one matrix product, and each query's partial softmaxes are merged by log-sum-exp
  rescaling (FlashAttention's merge): ``O(T * N * block_size)`` time, ``O(chunk * N * D)`` working memory whatever the
  selections look like; under autograd each chunk is recomputed in the backward pass (activation checkpointing), so
  training keeps ``O(T)`` between forward and backward.
- ``selected_attention_masked``: query-chunk-major: each chunk of queries scores all its causal keys with
  ``scaled_dot_product_attention`` under the chunk's selection mask: ``O(Tq * Tk)`` time in a few large products,
  ``O(chunk * Tk)`` working memory, checkpointed per chunk as above. It wastes the skipped keys' arithmetic but takes
  no per-block step, so it is the faster PyTorch form for small blocks (``function.pytorch_form`` says which runs).
  It computes in the inputs' dtype as SDPA does: scores and softmax accumulated in fp32, the probabilities rounded to
  bf16 / fp16 before the value product for such inputs (FlashAttention's rounding, the Triton kernels' too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def selection_mask(block_index: torch.Tensor, num_keys: int, block_size: int) -> torch.Tensor:
    """bool ``[B, HS, Tq, Tk]``: key ``j`` lies in a block of the query's row of ``block_index`` (``-1`` = empty slot;
    a block listed twice counts once; a block past the last key holds none)."""
    batch, heads, tq, _ = block_index.shape
    blocks = -(-num_keys // block_size)
    chosen = torch.zeros(batch, heads, tq, blocks + 1, dtype=torch.bool, device=block_index.device)
    # empty slots, and blocks past the last key (the masked form passes only the keys a chunk can see), go to a spare
    # column
    index = torch.where((block_index < 0) | (block_index >= blocks), blocks, block_index).long()
    chosen.scatter_(-1, index, True)
    return chosen[..., :blocks].repeat_interleave(block_size, dim=-1)[..., :num_keys]


def drop_repeated_blocks(block_index: torch.Tensor) -> torch.Tensor:
    """``block_index [B, HS, Tq, N]`` with every repeat of a block in a row after its first slot set to ``-1``, same
    dtype: the reference counts a block listed twice once; the key-block-major form and the Triton kernels would
    weigh it twice beside the row's other blocks, so the op drops repeats first (top-k never makes them; a caller's
    own selection may)."""
    ordered, order = block_index.sort(dim=-1, stable=True)
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[..., 1:] = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    repeat = torch.zeros_like(repeat).scatter_(-1, order, repeat)
    return block_index.masked_fill(repeat, -1)


def repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """A ``[B, HS, ...]`` per-head tensor for ``heads`` query heads (HS = heads, or HS KV heads each shared by
    ``heads / HS`` consecutive query heads, as GQA shares them)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def selected_attention_reference(q, k, v, block_index, block_size: int, scale: float, q_pos=None):
    """Reference: causal attention over the selected blocks with the whole mask and scores materialised.

    Args:
        q: ``[B, HQ, Tq, D]``; k, v: ``[B, HKV, Tk, D]`` (query head ``h`` uses KV head ``h // (HQ / HKV)``).
        block_index: ``[B, HS, Tq, N]`` integer block numbers per query, ``-1`` for an empty slot; ``HS`` is ``HQ``
            (a selection per query head) or ``HKV`` (one per GQA group).
        block_size: keys per block.
        scale: softmax scale.
        q_pos: ``[B, Tq]`` query positions (key ``j`` is at position ``j``); None: the last ``Tq`` of the ``Tk`` keys.

    Returns:
        ``[B, HQ, Tq, D]`` in ``q.dtype`` (scores and softmax in fp32 or wider); a row with no visible key is 0.
    """
    heads, tq, tk = q.shape[1], q.shape[2], k.shape[2]
    if q_pos is None:
        q_pos = torch.arange(tk - tq, tk, device=q.device)[None].expand(q.shape[0], tq)
    groups = heads // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    causal = torch.arange(tk, device=q.device)[None, None, None, :] <= q_pos[:, None, :, None]
    allowed = causal & repeat_heads(selection_mask(block_index, tk, block_size), heads)
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return (probs @ v.to(dtype)).to(q.dtype)


def _one_head(q, k, v, block_index, q_pos, block_size: int, scale: float):
    """One batch row and selection head, key-block-major: ``q [G, C, D]`` (the ``G`` query heads sharing the
    selection), ``k, v [Tk, D]``, ``block_index [C, N]``, ``q_pos [C]`` -> ``[G, C, D]`` (fp32 or wider).

    The (query, selected block) pairs are sorted by block; each block's keys are read once (a view) and scored against
    the queries that chose it by one matrix product, giving per pair the partial softmax statistics ``(m, l, o)``
    (maximum logit, sum of exponentials, weighted values, as FlashAttention's blocks); each query's pairs are then
    merged by log-sum-exp rescaling. Work is ``O(C * N * block_size * D)``, the pairs' statistics ``O(C * N * G * D)``.
    """
    groups, rows, dim = q.shape
    tk = k.shape[0]
    dtype = torch.promote_types(q.dtype, torch.float32)
    query, slot = (block_index >= 0).nonzero(as_tuple=True)
    blocks = block_index[query, slot]
    order = torch.argsort(blocks, stable=True)
    query, blocks = query[order], blocks[order]
    present, counts = torch.unique_consecutive(blocks, return_counts=True)
    q = q.to(dtype) * scale  # once, not per block
    maxima, sums, outs = [], [], []
    start = 0
    for block, count in zip(present.tolist(), counts.tolist()):
        rows_of = query[start:start + count]
        start += count
        lo, hi = block * block_size, min((block + 1) * block_size, tk)
        logits = q[:, rows_of] @ k[lo:hi].to(dtype).T  # [G, n, bs]
        positions = q_pos[rows_of]
        if hi - 1 > int(positions.min()):  # the block reaches past some of its queries: causal mask
            logits = logits.masked_fill(torch.arange(lo, hi, device=q.device) > positions[:, None], float("-inf"))
        peak = logits.amax(-1)  # [G, n]
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # a pair with no visible key
        weights = torch.exp(logits - peak[..., None])
        maxima.append(torch.where(weights.sum(-1) > 0, peak, torch.full_like(peak, float("-inf"))))
        sums.append(weights.sum(-1))
        outs.append(weights @ v[lo:hi].to(dtype))
    if not outs:
        return q.new_zeros(groups, rows, dim, dtype=dtype)
    maxima, sums, outs = torch.cat(maxima, 1), torch.cat(sums, 1), torch.cat(outs, 1)  # [G, P], [G, P], [G, P, D]
    index = query[None].expand(groups, -1)
    top = torch.full((groups, rows), float("-inf"), dtype=dtype, device=q.device)
    top = top.scatter_reduce(1, index, maxima, "amax")
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    scale_pairs = torch.exp(maxima - top.gather(1, index))  # [G, P]
    numerator = torch.zeros(groups, rows, dim, dtype=dtype, device=q.device).index_add(1, query, outs * scale_pairs[
        ..., None])
    denominator = torch.zeros(groups, rows, dtype=dtype, device=q.device).index_add(1, query, sums * scale_pairs)
    return numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))[..., None]


#: Elements of the pairs' statistics (``chunk * N * G * D``) one chunk of queries may hold: 256 MB in fp32.
PAIR_BUDGET = 1 << 26


def selected_attention_chunked(q, k, v, block_index, block_size: int, scale: float, q_pos=None,
                               chunk: int | None = None):
    """The key-block-major form: arguments and result as ``selected_attention_reference``, ``chunk`` queries at a
    time (None: as many as keep the pairs' statistics within ``PAIR_BUDGET``; fewer chunks, fewer per-block steps).
    Under autograd each (chunk, batch row, selection head) is recomputed in the
    backward pass (activation checkpointing), so training keeps only the outputs between forward and backward."""
    batch, heads, tq, dim = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    if q_pos is None:
        q_pos = torch.arange(tk - tq, tk, device=q.device)[None].expand(batch, tq)
    sel_heads = block_index.shape[1]
    groups = heads // sel_heads
    per_kv = sel_heads // kv_heads  # selection heads per KV head (> 1: a selection per query head under GQA)
    q = q.view(batch, sel_heads, groups, tq, dim)
    chunk = chunk or max(256, PAIR_BUDGET // (block_index.shape[-1] * groups * dim))
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    rows = []
    for b in range(batch):
        heads_out = []
        for h in range(sel_heads):
            parts = []
            for start in range(0, tq, chunk):
                stop = min(start + chunk, tq)
                args = (q[b, h, :, start:stop], k[b, h // per_kv], v[b, h // per_kv], block_index[b, h, start:stop],
                        q_pos[b, start:stop], block_size, scale)
                parts.append(checkpoint(_one_head, *args, use_reentrant=False) if recompute else _one_head(*args))
            heads_out.append(torch.cat(parts, 1) if len(parts) > 1 else parts[0])
        rows.append(torch.stack(heads_out))
    return torch.stack(rows).reshape(batch, heads, tq, dim).to(q.dtype)


#: Elements of the score-sized tensors (``HQ * chunk * Tk``) one chunk of the masked form may hold: 256 MB in fp32.
SCORE_BUDGET = 1 << 26


def _masked_chunk(q, k, v, block_index, q_pos, block_size: int, scale: float):
    """One chunk of the masked form: ``q [B, HQ, C, D]``, ``k, v [B, HKV, Tk, D]`` (the keys up to the chunk's last
    position), ``block_index [B, HS, C, N]``, ``q_pos [B, C]`` -> ``[B, HQ, C, D]`` in ``q.dtype``."""
    heads, tk = q.shape[1], k.shape[2]
    causal = torch.arange(tk, device=q.device)[None, None, None, :] <= q_pos[:, None, :, None]
    allowed = causal & repeat_heads(selection_mask(block_index, tk, block_size), heads)
    # a row with no visible key is 0 by the reference's convention; SDPA would give NaN (and NaN gradients), so such
    # a row sees key 0 and its output is zeroed: its gradient is then exactly 0
    empty = ~allowed.any(-1, keepdim=True)
    allowed[..., :1] |= empty
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=heads != k.shape[1])
    return out.masked_fill(empty, 0.0)


def selected_attention_masked(q, k, v, block_index, block_size: int, scale: float, q_pos=None,
                              chunk: int | None = None):
    """The masked form: arguments and result as ``selected_attention_reference``, ``chunk`` queries at a time (None:
    as many as keep ``HQ * chunk * Tk`` within ``SCORE_BUDGET``); each chunk reads only the keys up to its last
    query's position. Under autograd each chunk is recomputed in the backward pass (activation checkpointing)."""
    batch, heads, tq, _ = q.shape
    tk = k.shape[2]
    if q_pos is None:
        q_pos = torch.arange(tk - tq, tk, device=q.device)[None].expand(batch, tq)
    chunk = chunk or max(16, SCORE_BUDGET // (batch * heads * tk))
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    parts = []
    for start in range(0, tq, chunk):
        stop = min(start + chunk, tq)
        reach = min(tk, int(q_pos[:, start:stop].max()) + 1)  # later keys are causally masked for the whole chunk
        args = (q[:, :, start:stop], k[:, :, :reach], v[:, :, :reach], block_index[:, :, start:stop],
                q_pos[:, start:stop], block_size, scale)
        parts.append(checkpoint(_masked_chunk, *args, use_reentrant=False) if recompute else _masked_chunk(*args))
    return (torch.cat(parts, 2) if len(parts) > 1 else parts[0]).to(q.dtype)
