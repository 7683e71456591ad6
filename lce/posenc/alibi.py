"""ALiBi: attention with linear biases (Press et al. 2022, arXiv:2108.12409).

No position embedding at all: rotation is neutralised and each head ``h`` adds a linear penalty to the score of
query ``i`` and key ``j <= i`` (paper §3, Figure 3)::

    score(i, j) = q_i . k_j / sqrt(d) - m_h * (i - j)

The slopes ``m_h`` are a geometric sequence (paper §3; ``get_slopes`` in ofirpress/attention_with_linear_biases
``fairseq/models/transformer.py:742-760``): for ``H`` a power of two, ``m_h = 2^(-8h/H)``, ``h = 1..H``; otherwise the
``2^floor(log2 H)`` power-of-two slopes followed by every other slope of the ``2 * 2^floor(log2 H)`` sequence
(``[0::2]``), as many as are missing. attention-gym's ``2^(-8(h+1)/H)`` for every ``H`` is a different sequence for
non-power-of-two ``H`` and is not what the paper trained.

The reference code adds ``m_h * j`` instead of ``-m_h * (i - j)``: equal after the softmax (a per-row shift), valid for
causal attention only. lce keeps the ``(i - j)`` form, which is also better conditioned: in fp32 the ``m_h * j`` form
rounds every logit by up to ``m_h * j * 6e-8`` (3e-3 at ``j = 1e5``), while ``m_h * (i - j)`` is small, hence accurate,
for the nearby keys that carry the probability mass, and large only for keys the softmax ignores anyway.

Two computations with one signature: ``alibi_attention_eager`` materialises the ``[B, H, Tq, Tk]`` bias (the readable
reference), and ``alibi_attention`` (the default) hands one block of queries at a time to a fused SDPA call with that
block's bias, so neither the bias nor the scores ever exist for all ``Tq`` at once; with more than one block it
recomputes each
block in the backward pass (activation checkpointing per block), so training memory stays ``O(B * H * block * Tk)``
too. Under the ``triton`` backend (``auto`` on CUDA) lce's fused kernel (``lce.kernels.attention``) computes ALiBi in
registers instead, in one pass over all queries.

Both forms honour a sparse attention variant's restriction (``visible=``, ``lce.core.plan.Restriction``): the
eager one masks the hidden pairs, the block-wise one also scores only the key columns the restriction's block map
leaves, so ALiBi under a sliding window or BigBird's blocks costs ``O(T * visible keys)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lce.config import check
from lce.core.blockwise import allowed_pairs, key_columns
from lce.core.plan import RESTRICTION, FusedAttention, LayerAttention
from lce.posenc.base import POSENCS, PosEnc


def _power_of_two_slopes(n: int) -> list[float]:
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))  # = 2^(-8/n); start == ratio
    return [start ** (h + 1) for h in range(n)]


def alibi_slopes(num_heads: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The paper's per-head slopes ``m_h``, ``[H]`` (computed in fp64, returned in ``dtype``).

    Example: ``H = 8 -> 1/2, 1/4, ..., 1/256``; ``H = 12 -> 1/2 ... 1/256, 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5``.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = _power_of_two_slopes(closest)
    if closest != num_heads:
        slopes += _power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float64).to(dtype)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """``-m_h * (i - j)`` as ``[B, H, Tq, Tk]`` in ``slopes.dtype`` (``q_pos [B, Tq]``, ``k_pos [B, Tk]``)."""
    distance = (q_pos[:, :, None] - k_pos[:, None, :]).to(slopes.dtype)
    return -slopes[None, :, None, None] * distance[:, None]


def alibi_attention_eager(query, key, value, slopes, q_pos, k_pos, scaling, attention_mask=None, dropout=0.0,
                          visible=None):
    """Reference ALiBi attention with the whole bias materialised.

    Args:
        query: ``[B, H, Tq, D]`` (no rotation).
        key, value: ``[B, HKV, Tk, D]`` (``H`` a multiple of ``HKV``; query head ``h`` uses KV head ``h // (H/HKV)``).
        slopes: ``[H]``.
        q_pos, k_pos: ``[B, Tq]``, ``[B, Tk]`` absolute positions.
        scaling: softmax scale (``1/sqrt(D)``).
        attention_mask: ``[B, 1, Tq, Tk]`` boolean (True = may attend) or None; combined with causality.
        dropout: attention-probability dropout.
        visible: a sparse variant's restriction of the pairs that may attend, or None.

    Returns:
        ``[B, Tq, H, D]`` in ``query.dtype``; rows with no visible key are 0.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    score_dtype = torch.promote_types(query.dtype, torch.float32)
    scores = torch.matmul(query, key.transpose(-1, -2)).to(score_dtype) * scaling
    scores = scores + alibi_bias(slopes.to(score_dtype), q_pos, k_pos)
    scores = scores.masked_fill(~allowed_pairs(q_pos, k_pos, attention_mask, visible), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if dropout > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    return torch.matmul(probs.to(value.dtype), value).transpose(1, 2)


def _alibi_block(query, key, value, slopes, q_pos, k_pos, attention_mask, scaling, dropout, columns=slice(None),
                 visible=None):
    """One query block over its key columns: ``query [B, H, b, D]``, ``key/value [B, HKV, Tk, D]``, ``slopes [H]``
    -> ``[B, H, b, D]``.

    The bias ``-m_h (i - j)`` (``-inf`` for hidden pairs) is built for this block only, ``[B, H, b, n]``, and handed to
    one fused SDPA call (KV heads broadcast by ``enable_gqa``, no copies), which neither keeps the scores nor the
    probabilities: 2-3x faster on CPU than scoring, softmaxing and multiplying in three passes.
    """
    key, value, k_pos = key[:, :, columns], value[:, :, columns], k_pos[:, columns]
    if attention_mask is not None:
        attention_mask = attention_mask[..., columns]
    bias_dtype = torch.promote_types(query.dtype, torch.float32)
    hidden = ~allowed_pairs(q_pos, k_pos, attention_mask, visible)  # [B, 1 or H, b, n]
    # A row with no visible key (a left-pad query) keeps a finite bias and is zeroed after: an all -inf row gives NaN
    # probabilities, whose gradients leak NaN into every key.
    alive = ~hidden.all(dim=-1, keepdim=True)
    distance = (q_pos[:, :, None] - k_pos[:, None, :]).to(bias_dtype)[:, None]  # [B, 1, b, n]
    bias = (-slopes.to(bias_dtype)[None, :, None, None] * distance).masked_fill(hidden & alive, float("-inf"))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.to(query.dtype), dropout_p=dropout,
                                         scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out if bool(alive.all()) else out * alive


def alibi_attention(query, key, value, slopes, q_pos, k_pos, scaling, attention_mask=None, dropout=0.0,
                    block_size: int = 256, visible=None):
    """Block-wise ALiBi attention: same arguments and result as ``alibi_attention_eager``.

    Each block of ``block_size`` queries gets its own ``[B, H, block_size, Tk]`` bias and one fused SDPA call. With
    more than one block and gradients required, each block is recomputed in the backward pass, so memory stays
    ``O(B * H * block_size * Tk)`` in training as well. Under a restriction (``visible``) a block scores only the key
    columns its block map and causality leave.
    """
    if attention_mask is None and visible is None and not dropout and not torch.is_grad_enabled() and (
            query.device.type == "cpu"):
        return _alibi_inference(query, key, value, slopes, q_pos, k_pos, scaling, block_size)
    tq = query.shape[2]
    recompute = tq > block_size and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    outs = []
    for start in range(0, tq, block_size):
        stop = min(start + block_size, tq)
        mask = attention_mask[:, :, start:stop] if attention_mask is not None else None
        i = q_pos[:, start:stop]
        columns = key_columns(visible, i, k_pos)
        if isinstance(columns, slice) and columns.stop == columns.start:  # nothing visible: zero rows
            outs.append(query.new_zeros(*query.shape[:2], stop - start, value.shape[-1]))
            continue
        args = (query[:, :, start:stop], key, value, slopes, i, k_pos, mask, scaling, dropout, columns, visible)
        outs.append(checkpoint(_alibi_block, *args, use_reentrant=False) if recompute else _alibi_block(*args))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2)


def _alibi_inference(query, key, value, slopes, q_pos, k_pos, scaling, block_size: int):
    """``alibi_attention`` for unmasked causal inference on CPU, without a ``[b, Tk]`` bias per block.

    The ALiBi logit ``s q_i.k_j - m_h (i - j)`` is ``[s q_i.k_j + m_h (j - i_0)] - m_h (i - i_0)``: for the keys before
    a query block starting at ``i_0`` the bracket's bias depends on the key only (``[H, 1, n]``, broadcast over the
    rows) and the rest is a per-row shift, which leaves the softmax unchanged and moves its log-sum-exp by exactly that
    much. So each block takes two fused calls (PyTorch's CPU flash kernel, which returns the log-sum-exp): its past keys
    with that broadcast bias, its own ``b x b`` causal square with the full bias; merged by log-sum-exp weights, this
    is the same softmax (forward only: the weights would need the LSE's gradient).
    """
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    tq, tk = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    m = slopes.to(torch.promote_types(query.dtype, torch.float32))[None, :, None]  # [1, H, 1]
    outs = []
    for start in range(0, tq, block_size):
        stop = min(start + block_size, tq)
        own = slice(tk - tq + start, tk - tq + stop)  # this block's own keys; those before it are all visible
        i, j = q_pos[:, start:stop], k_pos[:, own]
        distance = (i[:, :, None] - j[:, None, :]).to(m.dtype)[:, None]  # [B, 1, b, b]
        square = (-m[..., None] * distance).masked_fill(distance < 0, float("-inf")).to(query.dtype)
        out, lse = flash(query[:, :, start:stop], key[:, :, own], value[:, :, own], 0.0, False, attn_mask=square,
                         scale=scaling)
        if own.start > 0:
            first = i[:, :1, None].to(m.dtype)  # [B, 1, 1]: i_0
            past = (m * (k_pos[:, None, :own.start].to(m.dtype) - first)).to(query.dtype)  # [B, H, n]
            past = past[:, :, None].expand(-1, -1, stop - start, -1)
            out_past, lse_past = flash(query[:, :, start:stop], key[:, :, :own.start], value[:, :, :own.start], 0.0,
                                       False, attn_mask=past, scale=scaling)
            lse_past = lse_past - m * (i[:, None, :].to(m.dtype) - first)
            top = torch.maximum(lse, lse_past)
            w_own, w_past = torch.exp(lse - top)[..., None], torch.exp(lse_past - top)[..., None]
            out = ((w_own * out.float() + w_past * out_past.float()) / (w_own + w_past)).to(query.dtype)
        outs.append(out)
    return torch.cat(outs, dim=2).transpose(1, 2)


@dataclass(frozen=True, eq=False)
class AlibiLayer(LayerAttention):
    """Every layer's attention under ALiBi: the per-head slopes ``[H]`` and how it is computed (``form``)."""

    slopes: torch.Tensor
    form: Literal["blockwise", "eager"] = "blockwise"
    block_size: int = 256
    handles: frozenset[str] = frozenset({RESTRICTION})

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout, *, q_pos, k_pos, visible=None,
                 **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        m = self.slopes.to(query.device)
        if self.form == "eager":
            return alibi_attention_eager(query, key, value, m, q_pos, k_pos, scale, attention_mask, dropout,
                                         visible=visible), None
        return alibi_attention(query, key, value, m, q_pos, k_pos, scale, attention_mask, dropout,
                               block_size=self.block_size, visible=visible), None

    def fused(self) -> FusedAttention:
        return FusedAttention(alibi_slopes=self.slopes)


@POSENCS.register("alibi")
@dataclass(frozen=True)
class Alibi(PosEnc):
    """ALiBi: no rotation; per-head linear distance penalty with the paper's slopes, in every layer.

    Attributes:
        kernel: how attention is computed (``AlibiLayer.form``): ``blockwise`` (query blocks, memory
            ``O(T * block_size)``) or ``eager`` (materialised ``[B, H, T, T]`` bias; the reference, for checks only).
            The name predates lce's Triton kernels and stays because saved run directories, results and checkpoints'
            patch specs carry it.
        block_size: query rows scored at once by the block-wise form.
    """

    signal = "alibi"
    name: str = "alibi"
    kernel: Literal["blockwise", "eager"] = "blockwise"
    block_size: int = 256

    def __post_init__(self):
        super().__post_init__()
        check(self.kernel in ("blockwise", "eager"), "posenc.kernel",
              f"{self.kernel!r} is not allowed; choose one of 'blockwise', 'eager'")
        check(self.block_size >= 1, "posenc.block_size", f"must be >= 1, got {self.block_size}")

    def apply(self, target) -> None:
        if target.has_rotary():
            target.neutralize_rotary("alibi")
        layer = AlibiLayer(alibi_slopes(target.config.num_attention_heads), self.kernel, self.block_size)
        target.compute_attention("alibi", lambda layer_index, module: layer)
