"""Causal linear attention: the machinery shared by ``linear_elu``, ``linear_relu``, ``performer``, ``transnormer`` and
``retention``.

Every variant maps queries and keys to features ``φ(q_i), φ(k_j) ∈ R^F`` and, per head, computes::

    num_i = Σ_{j<=i} d_ij (φ(q_i)·φ(k_j)) v_j      den_i = Σ_{j<=i} d_ij (φ(q_i)·φ(k_j))
    d_ij  = exp(a_{j+1} + ... + a_i)               (a_t <= 0: a per-step log-decay; 0 for no decay)

then turns ``(num, den)`` into the output: ``num / den`` (Katharopoulos et al.'s normalisation: linear_elu and
linear_relu add ``eps`` to ``den``, performer divides exactly) or a norm of ``num`` (transnormer, retention). The
decay is retention's ``γ^(i-j)`` and also carries performer's numerical stabiliser (see ``lce.attention.performer``).

Decoding keeps the recurrent state on the KV cache layer, which ``lce.hf`` finds and hands to each call (the layer's
computation declares ``RECURRENT_STATE``); nothing here knows a cache class or argument.

Three forms of one op; the first two are ``lce.kernels.linear_attention`` (reference, Triton kernels, dispatch):

- ``linear_attention_parallel``: the reference. Materialises the ``[Tq, Tk]`` scores ``φ(Q)φ(K)ᵀ ⊙ D`` (D the causal
  decay mask) and multiplies by V. ``O(T^2)`` memory.
- ``linear_attention_chunked``: chunks of ``C`` positions; inside a chunk the ``C x C`` scores are materialised, across
  chunks a running state carries the past (RetNet's chunkwise form, arXiv:2307.08621 eq. 7). ``O(T * C)`` memory, also
  for training. The fused Triton kernels on CUDA, the same form in PyTorch elsewhere (``lce.kernels.backend``).
- ``linear_attention_recurrent``: the RNN form ``S_t = e^{a_t} S_{t-1} + φ(k_t) v_tᵀ``, ``z_t = e^{a_t} z_{t-1} +
  φ(k_t)``, ``num_t = φ(q_t)ᵀ S_t``, ``den_t = φ(q_t)·z_t`` (Katharopoulos et al. §3.4; RetNet eq. 6); used to decode.

Integration (``LinearLayerAttention``, each layer's computation, installed through ``PatchTarget.compute_attention``):

- Initialisation: only how attention is computed from the model's q/k/v changes; its q/k/v/o projections (pretrained
  weights) are used as they are. No parameter is added (norms have no gain: ``o_proj`` absorbs a per-channel gain),
  so checkpoints keep the family's state dict and reload in transformers.
- Positions: q and k arrive rotated by the model's rotary embedding (any frequency method composes: rope, pi, yarn,
  ...). For a linear feature map (retention) ``(R_i q)·(R_j k) = q·R_{j-i} k`` is RoPE's relative form, which is
  RetNet's ``Θ`` rotation. For a nonlinear ``φ`` (elu+1, relu, Performer's random features) ``φ(R_i q)·φ(R_j k)``
  is not a function of ``i - j`` only: the rotation just makes the features position-dependent (Performer's
  features estimate ``exp(R_i q·R_j k / √d)``, i.e. RoPE softmax attention, in expectation).
- GQA: keys and values are repeated to the query heads (per-head decays and stabilisers need one state per query head).
- Padding: a key is visible when some query of the call may attend to it (the boolean mask transformers builds from
  ``attention_mask``); invisible keys (left padding) contribute nothing to any state. Windows in the mask are ignored:
  linear attention attends to every past token, and layers whose KV cache keeps only a window are refused.
- Attention dropout has no counterpart on linear attention's implicit weights and is not applied.
- Decoding (``Tq == 1``) runs the recurrent form from the state of the cached prefix. The state is kept on the layer's
  KV cache layer (``lce.hf.cache.RecurrentStateLayer``): ``O(1)`` per token in the context length while the cache
  holds exactly the tensors the state was computed from; otherwise (crop, beam reorder, reset, a cache layer that
  copies, gradients enabled) the state is recomputed from the cached keys and values with the chunked form,
  ``O(T)``. Both are exact. A call with cached keys but no cache lce can find among the attention module's arguments
  is an error, never a silent ``O(T)`` recomputation at every token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from lce.attention.base import AttentionVariant, select_layers
from lce.config import check
from lce.core.plan import RECURRENT_STATE, LayerAttention, NoCache
from lce.deprecated import renamed
from lce.errors import LceError
from lce.kernels.linear_attention import linear_attention, linear_attention_parallel

Form = Literal["chunked", "parallel", "recurrent"]

#: Positive and signed feature maps, by config name.
FEATURE_MAPS = {
    "elu_plus_one": lambda x: F.elu(x) + 1.0,
    "elu": F.elu,
    "relu": F.relu,
    "identity": lambda x: x,
}


@dataclass(frozen=True)
class LinearState:
    """What the recurrence carries past a prefix, per batch row and head.

    Attributes:
        S: ``[B, H, F, E]``, ``Σ_j d_tj φ(k_j) v_jᵀ``.
        z: ``[B, H, F]``, ``Σ_j d_tj φ(k_j)``.
        carry: a variant's own running quantity (Performer: the running maximum of its key log-features, ``[B, H]``).
    """

    S: torch.Tensor
    z: torch.Tensor
    carry: torch.Tensor | None = None


def empty_state(fk: torch.Tensor, v: torch.Tensor) -> LinearState:
    batch, heads, _, features = fk.shape
    return LinearState(fk.new_zeros(batch, heads, features, v.shape[-1]), fk.new_zeros(batch, heads, features))


def linear_attention_chunked(fq, fk, v, log_decay=None, state: LinearState | None = None, chunk_size: int = 64,
                             backend: str | None = None):
    """Chunkwise form (``lce.kernels.linear_attention.linear_attention``: the Triton kernels on CUDA, the PyTorch
    chunkwise form elsewhere), carrying a ``LinearState``.

    Args:
        fq: ``[B, H, T, F]`` query features aligned with the keys, or None to compute the final state only.
        fk, v, log_decay: as in ``linear_attention_parallel`` (``T`` positions, following ``state``).
        state: the state before the first position, or None (empty); its ``carry`` is handed on unchanged.
        chunk_size: ``C``.
        backend: ``ref``, ``triton`` or ``auto``/None (``lce.kernels.backend``).

    Returns:
        ``num [B, H, T, E]``, ``den [B, H, T]`` (None when ``fq`` is None) and the state after the last position.
    """
    initial = None if state is None else (state.S, state.z)
    num, den, (S, z) = linear_attention(fq, fk, v, log_decay, initial, chunk_size, backend)
    return num, den, LinearState(S, z, state.carry if state is not None else None)


def linear_attention_recurrent(fq, fk, v, log_decay=None, state: LinearState | None = None):
    """Recurrent form, one position at a time (decoding). Arguments and returns as ``linear_attention_chunked``."""
    state = state or empty_state(fk, v)
    S, z = state.S, state.z
    nums, dens = [], []
    for t in range(fk.shape[2]):
        if log_decay is not None:
            step = log_decay[:, :, t].exp()
            S, z = S * step[..., None, None], z * step[..., None]
        S = S + fk[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + fk[:, :, t]
        nums.append((fq[:, :, t, None, :] @ S).squeeze(-2))
        dens.append((fq[:, :, t] * z).sum(-1))
    return torch.stack(nums, dim=2), torch.stack(dens, dim=2), LinearState(S, z, state.carry)


def divide(num: torch.Tensor, den: torch.Tensor, eps: float) -> torch.Tensor:
    """Katharopoulos et al.'s normalisation ``num / (den + eps)``: ``[B, H, T, E]``, ``[B, H, T]`` ->
    ``[B, H, T, E]``."""
    return num / (den + eps)[..., None]


def head_norm(x: torch.Tensor, kind: Literal["rmsnorm", "layernorm"], eps: float, per_head: bool = True):
    """RMSNorm or LayerNorm of ``x [B, H, T, E]`` over each head's ``E`` channels (``per_head``; LayerNorm per head is
    GroupNorm with ``H`` groups) or over all ``H * E`` channels of a token. No gain or bias: ``o_proj`` absorbs them."""
    dims = (-1,) if per_head else (1, -1)
    if kind == "layernorm":
        x = x - x.mean(dims, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)


def mask_keys(fk: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Zero the features of keys that no query may see (``valid [B, T]``, None: all visible)."""
    return fk if valid is None else fk.masked_fill(~valid[:, None, :, None], 0.0)


def key_validity(attention_mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None:
    """``[B, Tk]``: keys some query of this call may attend to (None: all). Boolean masks are True where visible;
    additive float masks are 0 where visible and the dtype's minimum elsewhere."""
    if attention_mask is None:
        return None
    visible = attention_mask if attention_mask.dtype == torch.bool else (
        attention_mask > torch.finfo(attention_mask.dtype).min / 2)
    return visible.any(dim=(1, 2))[:, -kv_len:]


class LinearLayerAttention(LayerAttention):
    """The attention computation of one linear-attention layer, with its memoised constants (``memo``). It keeps the
    recurrent state in the KV cache: each call through the attention module receives its cache layer as ``state``
    (``lce.hf.cache``: a layer with ``recurrent_state``/``keep_recurrent_state``, or ``NoCache``); a direct call (no
    ``state``) recomputes the state of any cached prefix."""

    handles = frozenset({RECURRENT_STATE})

    def __init__(self, variant: LinearAttention, layer_index: int):
        self.variant = variant
        self.layer_index = layer_index
        self.memo: dict = {}

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout, *, q_pos, k_pos, state=None,
                 **kwargs):
        variant = self.variant
        _, heads, tq, dim = query.shape
        tk = key.shape[2]
        start = tk - tq
        if isinstance(state, NoCache):
            if start > 0:
                raise LceError(
                    f"linear attention layer {self.layer_index} received {start} cached keys but found no KV cache "
                    f"{state.why}, and the state of the whole prefix would be recomputed at every token"
                )
            state = None
        layer = state
        dtype = torch.promote_types(query.dtype, torch.float32)
        groups = heads // key.shape[1]
        valid = key_validity(attention_mask, tk)
        q = query.to(dtype)
        k = key.to(dtype).repeat_interleave(groups, dim=1)
        v = value.to(dtype).repeat_interleave(groups, dim=1)
        if valid is not None:  # a padded position's value may be anything (even NaN): 0 * NaN would poison the state
            v = v.masked_fill(~valid[:, None, :, None], 0.0)
        scaling = scaling if scaling is not None else dim ** -0.5
        context = variant.context(self, query=q, module=module)
        fq = variant.query_features(q, scaling, context)
        form = variant.form if tq > 1 else "recurrent"
        new_state = None
        if form == "parallel":
            fk, log_decay, _ = variant.key_features(k, valid, scaling, context, None)
            num, den = linear_attention_parallel(fq, fk, v, log_decay)
        else:
            caching = layer is not None and not torch.is_grad_enabled()
            state = layer.recurrent_state(start) if caching else None
            if state is not None and (state.S.dtype != dtype or state.S.device != q.device):
                state = None
            if state is None and start > 0:  # no usable state: recompute the prefix's from the cached keys and values
                fk, log_decay, carry = variant.key_features(k[:, :, :start], _part(valid, 0, start), scaling, context,
                                                            None)
                _, _, state = linear_attention_chunked(None, fk, v[:, :, :start], log_decay,
                                                       chunk_size=variant.chunk_size)
                state = dataclasses.replace(state, carry=carry)
            fk, log_decay, carry = variant.key_features(k[:, :, start:], _part(valid, start, tk), scaling, context,
                                                        state.carry if state is not None else None)
            if form == "recurrent":
                num, den, new_state = linear_attention_recurrent(fq, fk, v[:, :, start:], log_decay, state)
            else:
                num, den, new_state = linear_attention_chunked(fq, fk, v[:, :, start:], log_decay, state,
                                                               variant.chunk_size)
            new_state = dataclasses.replace(new_state, carry=carry)
            if caching:
                layer.keep_recurrent_state(new_state, key, value)
        out = variant.output(num, den)
        return out.transpose(1, 2).to(query.dtype), None


def _part(valid: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if valid is None else valid[:, start:stop]


@dataclass(frozen=True)
class LinearAttention(AttentionVariant):
    """Base of the linear attention variants: the form used for ``Tq > 1`` and the chunk size.

    Subclasses define the feature maps, the decay and the output rule; ``apply`` installs one
    ``LinearLayerAttention`` per selected layer (the others keep the model's attention).

    Attributes:
        chunk_size: positions per chunk of the chunked form (memory ``O(T * chunk_size)``).
        form: how training and prefill (``Tq > 1``) are computed: ``chunked`` (the efficient path), ``parallel``
            (the materialised reference, ``O(T^2)``) or ``recurrent`` (one position at a time). Decoding (``Tq == 1``)
            always runs the recurrent form.
    """

    chunk_size: int = 64
    form: Form = "chunked"

    def __post_init__(self):
        super().__post_init__()
        check(isinstance(self.chunk_size, int) and self.chunk_size >= 1, "attention.chunk_size",
              f"must be an integer >= 1, got {self.chunk_size!r}")
        check(self.form in get_args(Form), "attention.form",
              f"{self.form!r} is not one of {', '.join(get_args(Form))}")

    def apply(self, target) -> None:
        layers = select_layers(self.layers, target.config.num_hidden_layers)
        chosen = set(layers)
        target.compute_attention(self.name,
                                 lambda index, module: LinearLayerAttention(self, index) if index in chosen else None)

    def context(self, layer: LinearLayerAttention, query: torch.Tensor, module: nn.Module) -> Any:
        """Per-call constants (Performer's random features, retention's decays), memoised in ``layer.memo``."""
        return None

    def query_features(self, query: torch.Tensor, scaling: float, context: Any) -> torch.Tensor:
        """``φ(q)``: ``[B, H, Tq, D] -> [B, H, Tq, F]``."""
        raise NotImplementedError

    def key_features(self, key: torch.Tensor, valid: torch.Tensor | None, scaling: float, context: Any,
                     carry: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``φ(k) [B, H, T, F]`` (zero where not ``valid``), the log-decays ``[B, H, T]`` (or None) and the carry
        after the last position, continuing from ``carry`` (the previous positions')."""
        raise NotImplementedError

    def output(self, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        """The attention output ``[B, H, T, E]`` from ``num [B, H, T, E]`` and ``den [B, H, T]``."""
        raise NotImplementedError


@dataclass(frozen=True)
class FeatureMapAttention(LinearAttention):
    """Linear attention with a fixed feature map and Katharopoulos et al.'s normalisation (arXiv:2006.16236 §3.2-3.3)::

        out_i = φ(q_i)ᵀ Σ_{j<=i} φ(k_j) v_jᵀ / (φ(q_i)ᵀ Σ_{j<=i} φ(k_j) + eps)

    ``φ`` is applied to q and k as they arrive (no ``1/√d``: the similarity ``φ(q)·φ(k)`` replaces ``exp(q·k/√d)``).

    Attributes:
        eps: added to the denominator (1e-6 as in the reference implementation, fast-transformers).
    """

    eps: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        check(self.eps > 0, "attention.eps", f"must be > 0, got {self.eps}")

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def query_features(self, query, scaling, context):
        return self.feature_map(query)

    def key_features(self, key, valid, scaling, context, carry):
        return mask_keys(self.feature_map(key), valid), None, None

    def output(self, num, den):
        return divide(num, den, self.eps)


__getattr__ = renamed(__name__, {"KernelizedAttention": "lce.attention.linear.FeatureMapAttention",
                                 "LinearKernel": "lce.attention.linear.LinearLayerAttention"})
