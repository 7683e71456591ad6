"""Rotary position embedding, the readable reference (Su et al. 2021, "RoFormer", arXiv:2104.09864, eq. 34).

Pair ``i`` of the leading ``R`` dims of a head vector is rotated by the angle ``pos * inv_freq[i]``::

    out_1 = x_1 cos - x_2 sin,    out_2 = x_2 cos + x_1 sin

``half`` pairs ``x[i]`` with ``x[i + R/2]`` (Llama's ``rotate_half``), ``interleaved`` pairs ``x[2i]`` with
``x[2i + 1]`` (GPT-J, Cohere); dims past ``R`` pass through (partial rotary). As in transformers
(``LlamaRotaryEmbedding`` + ``apply_rotary_pos_emb``), angles are computed in fp32, cos and sin are multiplied by
``attention_scaling`` (YaRN / LongRoPE temperature) and cast to the input dtype before the rotation, so this equals
transformers' result bit for bit. The frequency table is all a scaling method changes (PI, NTK, YaRN, llama3,
LongRoPE): it is an argument.
"""

from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0,
                 style: str = "half", dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``positions [..., T]``, ``inv_freq [R/2]`` -> ``cos, sin [..., T, R]`` (computed in fp32, returned in ``dtype``),
    laid out to multiply the rotated dims of a head vector in ``style``."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)
    if style == "half":
        angles = torch.cat((angles, angles), dim=-1)
    else:
        angles = torch.repeat_interleave(angles, 2, dim=-1)
    return (angles.cos() * attention_scaling).to(dtype), (angles.sin() * attention_scaling).to(dtype)


def rope_reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0,
                   style: str = "half") -> torch.Tensor:
    """Rotate ``x [B, H, T, D]`` at ``positions [B, T]`` (or ``[T]``, or ``[1, T]`` for every row).

    Args:
        inv_freq: ``[R/2]`` inverse frequencies; the leading ``R <= D`` dims are rotated, the rest pass through.
        attention_scaling: multiplies cos and sin (the rotated dims only).
        style: ``half`` or ``interleaved`` pairing.

    Returns:
        ``[B, H, T, D]`` in ``x.dtype``.
    """
    return rotate(x, *rope_cos_sin(positions, inv_freq, attention_scaling, style, x.dtype), style)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "half") -> torch.Tensor:
    """Rotate ``x [B, H, T, D]`` by ``cos, sin`` (``rope_cos_sin``'s, ``[B, T, R]`` or ``[T, R]``, in ``x.dtype``)."""
    if cos.dim() == 3:  # [B, T, R] -> [B, 1, T, R] to broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    if style == "half":
        # out_1 = x_1 cos - x_2 sin, out_2 = x_2 cos + x_1 sin, each product rounded to x.dtype before the sum as in
        # transformers' ``q * cos + rotate_half(q) * sin`` (a - b == a + (-b) exactly), without building rotate_half.
        half = r // 2
        out = rot * cos
        out[..., :half] -= rot[..., half:] * sin[..., :half]
        out[..., half:] += rot[..., :half] * sin[..., half:]
    else:
        turned = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
        out = rot * cos + turned * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out
