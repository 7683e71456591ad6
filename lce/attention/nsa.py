"""NSA: Native Sparse Attention (Yuan et al. 2025, "Native Sparse Attention: Hardware-Aligned and Natively Trainable
Sparse Attention", arXiv:2502.11089, §3.2-3.3), swapped into a pretrained model's attention layers.

Each query ``q_t`` attends through three branches over the model's own keys and values, mixed by learned gates
(eq. 5)::

    o_t = g_cmp · Attn(q_t, K̃cmp, Ṽcmp) + g_slc · Attn(q_t, K̃slc, Ṽslc) + g_win · Attn(q_t, K̃win, Ṽwin),
    g = sigmoid(W_g x_t + b_g)  per query head (x_t: the attention layer's input)

- compression (eq. 7): blocks of ``l = compress_block`` keys every ``d = compress_stride`` positions, each mapped to
  one key ``φ_K(k_{id:id+l})`` (and value ``φ_V``); a query sees block ``i`` once it is complete
  (``i*d + l - 1 <= t``);
- selection (eq. 8-12): the compression branch's probabilities ``p_cmp`` (eq. 8) scored per selection block of
  ``l' = select_block`` keys by summing the compressed blocks that overlap it (eq. 9), summed over the query heads of a
  GQA group (eq. 10: the group shares its selection, so a kernel loads each selected block once per group), and the
  ``top_n`` best blocks (eq. 11, the ``initial_blocks`` first and ``local_blocks`` latest always among them) attended
  with one softmax, causally (eq. 12; ``lce.kernels.selected_attention``);
- sliding window (§3.3.3): the ``window`` latest keys, the query's own included.

Paper vs this implementation:

- Eq. 9 as printed sums ``p_cmp[l'/d·j - m - n]`` for ``m < l'/d``, ``n < l/d``; its indices count blocks from 1 and
  the intent (§3.3.2, "according to their spatial relationship") is the compressed blocks that overlap selection
  block ``j``. lce sums exactly those, ``{i : i*d < (j+1)*l' and i*d + l > j*l'}``, which also holds when ``d``
  does not divide ``l'``; with ``l = l' = d`` it is ``p_slc = p_cmp``, flash-linear-attention's NSA.
- The branches share the model's keys and values (the paper trains separate ones from scratch; a swapped pretrained
  model has one set). ``φ`` is "a learnable MLP with intra-block position encoding": here
  ``φ(x) = mean(x) + W_2 GELU(W_1 flatten(x + P))`` per layer, shared by the KV heads, hidden width the head dim,
  with ``W_2 = 0`` and ``P = 0`` at swap time, so it starts as mean pooling (flash-linear-attention's NSA compresses
  by mean pooling) and learns from there.
- Initialisation close to the original model: ``W_g = 0`` and ``b_g`` the ``gate_bias_*`` (default ``(-4, 4, -4)``:
  ``g_slc = 0.982``, the other two ``0.018``), so the swapped layer is almost its selected branch, which with the
  initial and local blocks is full attention up to ``top_n * select_block`` keys and a close approximation beyond;
  the gates stay trainable (``sigmoid'(±4) = 0.018``).
- Queries and keys are the model's, after its rotary embedding; compressed keys are made from rotated keys (as in
  flash-linear-attention's NSA).

Defaults are the paper's (§4.1): ``l = 32``, ``d = 16``, ``l' = 64``, ``n = 16`` (1 initial and 2 local blocks
included), ``w = 512``. New parameters per NSA layer: ``φ_K``, ``φ_V`` (``2 * (l*D*D + 2D + D*D + l*D)``) and the gate
(``hidden * 3H + 3H``); they are saved with the model and reloaded by ``lce.load_model``. The top-n choice is not
differentiable (as in the paper); everything else is: the compression branch, and through it ``φ`` and the gates.
Decoding computes each new token's three branches over the whole KV cache, its compressed keys included (recomputed
from the cached keys at every step: exact, ``O(T)`` per token and layer, not cached).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lce.attention.base import ATTENTIONS, AttentionVariant, select_layers
from lce.attention.block_selection import check_unpadded, choose_blocks
from lce.attention.sliding_window import SlidingWindowPattern
from lce.config import check
from lce.core.blockwise import blockwise_attention, masked_attention_eager
from lce.core.plan import HIDDEN_STATES, LayerAttention
from lce.errors import LceError
from lce.kernels.selected_attention import selected_attention, selected_attention_reference

#: Queries whose compressed scores are formed at once (``[B, H, COMPRESS_CHUNK, n_cmp]`` at a time).
COMPRESS_CHUNK = 256


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores and mixing are formed in: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


class BlockCompressor(nn.Module):
    """``φ``: ``[..., l, D]`` blocks of keys (or values) -> ``[..., D]``, ``mean(x) + W_2 GELU(W_1 flatten(x + P))``;
    ``W_2 = 0``, ``P = 0`` at initialisation (mean pooling)."""

    def __init__(self, block: int, dim: int, generator: torch.Generator):
        super().__init__()
        self.position = nn.Parameter(torch.zeros(block, dim))
        self.up = nn.Linear(block * dim, dim)
        self.down = nn.Linear(dim, dim)
        bound = 1.0 / math.sqrt(block * dim)  # nn.Linear's default range, drawn from a seeded generator
        with torch.no_grad():
            self.up.weight.uniform_(-bound, bound, generator=generator)
            self.up.bias.uniform_(-bound, bound, generator=generator)
            self.down.weight.zero_()
            self.down.bias.zero_()

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        residual = self.down(F.gelu(self.up((blocks + self.position).flatten(-2))))
        return blocks.mean(-2) + residual


class NSAParameters(nn.Module):
    """The parameters NSA adds to one attention module (attached as ``lce_nsa``): ``φ_K``, ``φ_V`` and the gate."""

    def __init__(self, variant: NSA, hidden_size: int, heads: int, head_dim: int, layer_index: int):
        super().__init__()
        generator = torch.Generator().manual_seed(variant.seed * 1_000_003 + layer_index)
        self.key_compressor = BlockCompressor(variant.compress_block, head_dim, generator)
        self.value_compressor = BlockCompressor(variant.compress_block, head_dim, generator)
        self.gate = nn.Linear(hidden_size, heads * 3)
        with torch.no_grad():
            self.gate.weight.zero_()
            bias = [variant.gate_bias_compressed, variant.gate_bias_selected, variant.gate_bias_window]
            self.gate.bias.copy_(torch.tensor(bias).repeat(heads))

    def gates(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, Tq, hidden]`` -> ``[B, H, Tq, 3]`` (compression, selection, window) in fp32 or wider."""
        batch, length, _ = hidden_states.shape
        logits = self.gate(hidden_states.to(self.gate.weight.dtype))
        g = torch.sigmoid(logits.to(wide(logits.dtype)))
        return g.view(batch, length, -1, 3).transpose(1, 2)


def compress(key: torch.Tensor, compressor: nn.Module, block: int, stride: int) -> torch.Tensor:
    """Compressed keys (or values) ``[B, H, n_cmp, D]`` of ``[B, H, T, D]``: block ``i`` covers positions
    ``i*stride .. i*stride + block - 1``; only complete blocks (``n_cmp = (T - block) // stride + 1``)."""
    if key.shape[2] < block:
        return key.new_zeros(*key.shape[:2], 0, key.shape[-1])
    blocks = key.unfold(2, block, stride).transpose(-1, -2)  # [B, H, n_cmp, block, D]
    return compressor(blocks.to(compressor.down.weight.dtype))


def overlap_matrix(compressed: int, block: int, stride: int, select_block: int, selected: int,
                   device) -> torch.Tensor:
    """fp32 ``[n_cmp, n_slc]``: 1 where compressed block ``i`` (``[i*stride, i*stride + block)``) overlaps selection
    block ``j`` (``[j*select_block, (j+1)*select_block)``), the sum of eq. 9."""
    start = torch.arange(compressed, device=device)[:, None] * stride
    first = torch.arange(selected, device=device)[None, :] * select_block
    return ((start < first + select_block) & (start + block > first)).float()


def compressed_visible(q_pos: torch.Tensor, compressed: int, block: int, stride: int) -> torch.Tensor:
    """bool ``[B, 1, C, n_cmp]``: compressed block ``i`` is complete at query position ``t``
    (``i*stride + block - 1 <= t``)."""
    ends = torch.arange(compressed, device=q_pos.device) * stride + block - 1
    return (ends <= q_pos[:, None, :, None])


def _compressed_branch(query, ck, cv, visible, scale):
    """``query [B, HKV, G, C, D]``, ``ck, cv [B, HKV, n, D]``, ``visible [B, 1, 1, C, n]`` -> output
    ``[B, HKV, G, C, D]`` and probabilities ``[B, HKV, G, C, n]`` (fp32; rows with no complete block are 0)."""
    dtype = wide(query.dtype)
    scores = torch.einsum("bhgcd,bhnd->bhgcn", query.to(dtype), ck.to(dtype)) * scale
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhgcn,bhnd->bhgcd", probs, cv.to(dtype)), probs


@dataclass(frozen=True)
class NSAResult:
    """The three branches and the selection of one NSA call (for tests and analysis)."""

    compressed: torch.Tensor  # [B, H, Tq, D] fp32 or wider
    selected: torch.Tensor  # [B, H, Tq, D]
    window: torch.Tensor  # [B, H, Tq, D]
    chosen: torch.Tensor  # [B, HKV, Tq, n] int64, -1 = empty


def nsa_branches(variant: NSA, params: NSAParameters, query, key, value, q_pos, scale: float) -> NSAResult:
    """The fast path: compression chunked over queries (recomputed in the backward pass), selection from its
    probabilities, the selected branch by ``lce.kernels.selected_attention`` (Triton on CUDA), the window by lce's
    block-wise attention. ``query [B, H, Tq, D]``, ``key/value [B, HKV, Tk, D]``, ``q_pos [B, Tq]``."""
    batch, heads, tq, dim = query.shape
    kv_heads, tk = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    l, d, ls = variant.compress_block, variant.compress_stride, variant.select_block
    ck = compress(key, params.key_compressor, l, d)
    cv = compress(value, params.value_compressor, l, d)
    n_cmp, n_slc = ck.shape[2], -(-tk // ls)
    overlap = overlap_matrix(n_cmp, l, d, ls, n_slc, query.device).to(wide(query.dtype))
    q = query.view(batch, kv_heads, groups, tq, dim)
    recompute = tq > COMPRESS_CHUNK and torch.is_grad_enabled()
    outs, chosen = [], []
    for start in range(0, tq, COMPRESS_CHUNK):
        stop = min(start + COMPRESS_CHUNK, tq)
        visible = compressed_visible(q_pos[:, start:stop], n_cmp, l, d)[:, :, None]
        args = (q[:, :, :, start:stop], ck, cv, visible, scale)
        out, probs = checkpoint(_compressed_branch, *args, use_reentrant=False) if recompute \
            else _compressed_branch(*args)
        outs.append(out)
        with torch.no_grad():
            group_scores = (probs.detach() @ overlap).sum(2)  # eq. 9, then eq. 10: [B, HKV, C, n_slc]
            chosen.append(choose_blocks(group_scores, q_pos[:, start:stop], ls, variant.top_n,
                                        variant.initial_blocks, variant.local_blocks))
    compressed = torch.cat(outs, dim=3).view(batch, heads, tq, dim)
    chosen = torch.cat(chosen, dim=2)
    selected = selected_attention(query, key, value, chosen, ls, scale, q_pos)
    k_pos = torch.arange(tk, device=query.device)[None].expand(batch, tk)
    window = blockwise_attention(query, key, value, q_pos, k_pos, scale,
                                 visible=SlidingWindowPattern(variant.window)).transpose(1, 2)
    return NSAResult(compressed, selected, window, chosen)


def nsa_reference_branches(variant: NSA, params: NSAParameters, query, key, value, q_pos, scale: float) -> NSAResult:
    """Reference: every score materialised, eq. 8-12 as written (``p_cmp [B, H, Tq, n_cmp]``, ``p_slc`` by the
    overlap sum, the group sum, the ranking), each branch by materialised masked attention. Arguments as
    ``nsa_branches``."""
    batch, heads, tq, _ = query.shape
    kv_heads, tk = key.shape[1], key.shape[2]
    l, d, ls = variant.compress_block, variant.compress_stride, variant.select_block
    ck = compress(key, params.key_compressor, l, d).repeat_interleave(heads // kv_heads, dim=1)
    cv = compress(value, params.value_compressor, l, d).repeat_interleave(heads // kv_heads, dim=1)
    dtype = wide(query.dtype)
    scores = (query.to(dtype) @ ck.to(dtype).transpose(-1, -2)) * scale  # eq. 8
    visible = compressed_visible(q_pos, ck.shape[2], l, d)
    p_cmp = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    compressed = p_cmp @ cv.to(dtype)
    p_slc = p_cmp @ overlap_matrix(ck.shape[2], l, d, ls, -(-tk // ls), query.device).to(dtype)  # eq. 9
    p_group = p_slc.view(batch, kv_heads, heads // kv_heads, tq, -1).sum(2)  # eq. 10
    chosen = choose_blocks(p_group, q_pos, ls, variant.top_n, variant.initial_blocks, variant.local_blocks)  # eq. 11
    selected = selected_attention_reference(query, key, value, chosen, ls, scale, q_pos)  # eq. 12
    k_pos = torch.arange(tk, device=query.device)[None].expand(batch, tk)
    window = masked_attention_eager(query, key, value, q_pos, k_pos, scale,
                                    visible=SlidingWindowPattern(variant.window)).transpose(1, 2)
    return NSAResult(compressed, selected, window, chosen)


def mix(result: NSAResult, gates: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Eq. 5: ``[B, H, Tq, 3]`` gates over the three branches -> ``[B, Tq, H, D]`` in ``dtype`` (mixed in fp32 or
    wider)."""
    compute = wide(dtype)
    out = (gates[..., 0:1] * result.compressed.to(compute) + gates[..., 1:2] * result.selected.to(compute)
           + gates[..., 2:3] * result.window.to(compute))
    return out.transpose(1, 2).to(dtype)


class NSALayerAttention(LayerAttention):
    """One NSA layer: its parameters (the attention module's ``lce_nsa``) and the three branches."""

    handles = frozenset({HIDDEN_STATES})

    def __init__(self, variant: NSA, params: NSAParameters, reference: bool = False):
        self.variant = variant
        self.params = params
        self.branches = nsa_reference_branches if reference else nsa_branches

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout, *, q_pos, k_pos,
                 hidden_states=None, **kwargs):
        check_unpadded("nsa", attention_mask, k_pos)
        if hidden_states is None:
            raise LceError("attention=nsa computes its gates from the attention layer's input, which this call did not "
                           "receive (call the model, not the attention function directly)")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        result = self.branches(self.variant, self.params, query, key, value, q_pos, scale)
        return mix(result, self.params.gates(hidden_states), query.dtype), None


@ATTENTIONS.register("nsa")
@dataclass(frozen=True)
class NSA(AttentionVariant):
    """Native Sparse Attention: compressed, selected and sliding-window branches mixed by learned gates.

    Attributes:
        compress_block: ``l``, keys per compressed block (the paper: 32).
        compress_stride: ``d``, positions between compressed blocks (16; ``<= compress_block``).
        select_block: ``l'``, keys per selection block (64; with the Triton kernels a power of two >= 16).
        top_n: ``n``, selection blocks per query, the initial and local ones included (16).
        initial_blocks: leading selection blocks always selected (1).
        local_blocks: selection blocks ending at the query's own always selected (2).
        window: keys of the sliding-window branch, the query's own included (512).
        gate_bias_compressed, gate_bias_selected, gate_bias_window: the gates' initial biases; their weights start
            at 0.
        seed: seed of the compressors' initial weights (with the layer index).
    """

    name: str = "nsa"
    compress_block: int = 32
    compress_stride: int = 16
    select_block: int = 64
    top_n: int = 16
    initial_blocks: int = 1
    local_blocks: int = 2
    window: int = 512
    gate_bias_compressed: float = -4.0
    gate_bias_selected: float = 4.0
    gate_bias_window: float = -4.0
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        for field in ("compress_block", "compress_stride", "select_block", "top_n", "window"):
            value = getattr(self, field)
            check(isinstance(value, int) and value >= 1, f"attention.{field}",
                  f"must be an integer >= 1, got {value!r}")
        check(self.compress_stride <= self.compress_block, "attention.compress_stride",
              f"{self.compress_stride} must be <= compress_block = {self.compress_block} (no key left uncompressed)")
        check(self.initial_blocks >= 0 and self.local_blocks >= 1, "attention.local_blocks",
              f"initial_blocks must be >= 0 and local_blocks >= 1 (the query's own block), got "
              f"{self.initial_blocks} and {self.local_blocks}")
        check(self.top_n >= self.initial_blocks + self.local_blocks, "attention.top_n",
              f"{self.top_n} must be >= initial_blocks + local_blocks = {self.initial_blocks + self.local_blocks} "
              "(the forced blocks count)")
        check(self.layers != [], "attention.layers", "selects no layer; list at least one index")

    def apply(self, target) -> None:
        chosen = set(select_layers(self.layers, target.config.num_hidden_layers))
        config = target.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

        def build(index: int, module: nn.Module) -> NSAParameters | None:
            if index not in chosen:
                return None
            weight = next(module.parameters())
            return NSAParameters(self, config.hidden_size, heads, head_dim, index).to(weight.device, weight.dtype)

        target.attach_parameters(self.name, build)
        target.compute_attention(self.name, lambda index, module: NSALayerAttention(self, module.lce_nsa)
                                 if index in chosen else None)
