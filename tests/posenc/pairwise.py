"""A per-pair attention reference shared by the position-remapping methods' tests."""

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def per_pair_reference(q, k, v, distance, scaling, rotary):
    """Attention with each score written from its relative distance: s = q_i . R(-r) k_j * scaling, where
    ``distance(b, i) = {j: r}`` lists the keys query i attends and their relative positions, and R is transformers'
    own rotary embedding (R(m)^T R(n) = R(n - m), so rotating only the key by -r gives the logit of a pair r apart)."""
    batch, heads, tq, dim = q.shape
    groups = heads // k.shape[1]
    out = torch.zeros(batch, tq, heads, dim, dtype=q.dtype)
    for b in range(batch):
        for i in range(tq):
            pairs = distance(b, i)
            keys = sorted(pairs)
            if not keys:
                continue
            rel = torch.tensor([[pairs[j] for j in keys]])
            cos, sin = rotary(k, -rel)
            k_rot, _ = apply_rotary_pos_emb(k[b : b + 1, :, keys], k[b : b + 1, :, keys], cos, sin)
            k_rot, vals = k_rot[0].repeat_interleave(groups, 0), v[b, :, keys].repeat_interleave(groups, 0)
            scores = (q[b, :, i, None, :] * k_rot).sum(-1) * scaling  # [H, n]
            out[b, i] = torch.einsum("hn,hnd->hd", torch.softmax(scores, -1), vals)
    return out


def random_qkv(batch, heads, kv_heads, tq, tk, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, tq, dim), (batch, kv_heads, tk, dim), (batch, kv_heads, tk, dim)]
    return [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


def dispatcher_positions(batch, tq, tk, pads):
    """Positions and mask as lce's dispatcher passes them: row b has pads[b] left pads (negative key positions)."""
    k_pos = torch.stack([torch.arange(tk) - p for p in pads[:batch]])
    q_pos = k_pos[:, tk - tq:].clamp(min=0)
    causal = torch.arange(tk)[None, :] <= torch.arange(tk - tq, tk)[:, None]  # by index, as sdpa_mask builds it
    mask = (causal[None] & (k_pos[:, None, :] >= 0))[:, None]  # pad queries see nothing
    return q_pos, k_pos, mask if any(pads[:batch]) else None
