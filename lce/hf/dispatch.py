"""lce's attention function: one dispatcher registered with transformers, running the plan on each layer.

transformers looks attention functions up by name in a process-wide registry (``AttentionInterface``), so lce
registers one stateless dispatcher under ``lce_<name>`` names; what a layer does lives on that layer's attention
module (``module.lce_plan``, a ``lce.core.plan.AttentionPlan``), so two models in one process never share state.
Every name is registered with the SDPA mask function too (``AttentionMaskInterface``): without it transformers passes
``attention_mask=None`` to a custom attention function and padding is silently ignored.

The dispatcher scales queries by position (log-n) and then runs the layer's ``LayerAttention`` in transformers'
argument order with the query and key positions, or transformers' SDPA attention when the plan has none. A sparse
variant's ``Restriction`` goes to it as ``visible=``; a layer restricted while its encoding leaves attention to the
model runs ``BlockwiseAttention``. A computation that keeps a recurrent state (``RECURRENT_STATE``) gets the call's
KV cache layer as ``state=``, found by a forward pre-hook on its module (``capture_recurrent_state``) before the module
updates the cache.

Backends: a plan may also describe its layer as data (``FusedAttention``), which ``lce.kernels.attention``'s one-pass
Triton kernel computes. The dispatcher runs that kernel when the backend resolves to ``triton`` (``auto`` on CUDA,
``LCE_BACKEND``, or a run's ``backend`` field; see ``lce.kernels.backend``) and the call is one the kernel covers: no
padding mask (transformers passes None for unpadded causal batches), no attention dropout, no logit soft-cap, and a
restriction that has a kernel form (``Restriction.kernel_pattern``). Every other call runs the layer's PyTorch
computation, so choosing a backend never changes what is computed, only how.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lce.core.blockwise import blockwise_attention
from lce.core.plan import (
    BIDIRECTIONAL,
    RESTRICTION,
    SOFTCAP,
    AttentionPlan,
    FusedAttention,
    LayerAttention,
    NoCache,
    key_positions,
    query_positions,
)
from lce.hf.cache import CACHE_ARGUMENTS, recurrent_state_layer
from lce.kernels.attention import AttentionSpec, flash_attention
from lce.kernels.backend import resolve_backend


def lce_attention_forward(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function transformers calls for ``attn_implementation="lce_<name>"``."""
    plan: AttentionPlan = module.lce_plan
    q_pos = query_positions(query, key, kwargs)
    if plan.fused is not None:
        out = fused_attention(plan, module, query, key, value, attention_mask, scaling, dropout, q_pos, kwargs)
        if out is not None:
            return out, None
    if plan.q_scale is not None:
        query = query * plan.q_scale(q_pos)[:, None, :, None].to(query.dtype)
    if plan.attention is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if plan.restriction is not None:
        kwargs["visible"] = plan.restriction.at(module, key.shape[2])
    if "lce_state" in module.__dict__:  # set by capture_recurrent_state for this call only
        kwargs["state"] = module.__dict__.pop("lce_state")
    if "lce_hidden_states" in module.__dict__:  # set by capture_hidden_states for this call only
        kwargs["hidden_states"] = module.__dict__.pop("lce_hidden_states")
    return plan.attention(module, query, key, value, attention_mask, scaling, dropout, q_pos=q_pos,
                          k_pos=key_positions(q_pos, key.shape[2]), **kwargs)


def capture_hidden_states(module: nn.Module, args, kwargs) -> None:
    """Forward pre-hook on the attention module of a layer whose computation reads the module's input
    (``HIDDEN_STATES``): the call's ``hidden_states`` (first positional argument or keyword)."""
    module.lce_hidden_states = args[0] if args else kwargs["hidden_states"]


def capture_recurrent_state(layer_index: int, module: nn.Module, args, kwargs) -> None:
    """Forward pre-hook (bound to its layer's index) on the attention module of a layer whose computation keeps a
    recurrent state: the cache layer of this call (``lce.hf.cache.recurrent_state_layer``, before the module updates
    the cache), or ``NoCache``."""
    layer = recurrent_state_layer(kwargs, getattr(module, "layer_idx", layer_index))
    module.lce_state = layer if layer is not None else NoCache(
        f"among the attention module's arguments ({', '.join(CACHE_ARGUMENTS)}): this transformers passes it "
        "differently")


class BlockwiseAttention(LayerAttention):
    """A restricted layer whose position encoding leaves attention to the model: ``blockwise_attention`` while the
    restriction is in force, the layer's own attention otherwise (``own``, or transformers' SDPA if None)."""

    handles = frozenset({RESTRICTION})

    def __init__(self, own: LayerAttention | None):
        self.own = own

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout, *, q_pos, k_pos, visible=None,
                 **kwargs):
        if visible is None:
            if self.own is not None:
                return self.own(module, query, key, value, attention_mask, scaling, dropout, q_pos=q_pos,
                                k_pos=k_pos, **kwargs)
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = blockwise_attention(query, key, value, q_pos, k_pos, scale, attention_mask, visible,
                                  block_size=visible.query_block, softcap=kwargs.get("softcap"), dropout=dropout)
        return out, None


class EagerAttention(LayerAttention):
    """A family's own eager attention function (transformers' ``eager_attention_forward`` of its modeling module),
    for families whose attention SDPA cannot reproduce (soft-capping).

    lce registers its attention names with the SDPA mask function, so masks arrive boolean or None (plain causal,
    or no mask for bidirectional modules); eager attention functions add a float mask, so it is converted exactly as
    transformers' ``eager_mask`` does (0 where visible, the dtype's minimum elsewhere).
    """

    handles = frozenset({SOFTCAP, BIDIRECTIONAL})

    def __init__(self, eager_attention_forward: Callable):
        self.eager_attention_forward = eager_attention_forward

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout, *, q_pos, k_pos, **kwargs):
        if attention_mask is None and getattr(module, "is_causal", True):
            attention_mask = (k_pos[:, None, :] <= q_pos[:, :, None])[:, None]
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            attention_mask = torch.where(attention_mask, torch.zeros((), device=query.device, dtype=query.dtype),
                                         torch.finfo(query.dtype).min)
        return self.eager_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                            scaling=scaling, **kwargs)


@dataclass(frozen=True, eq=False)
class FunctionAttention(LayerAttention):
    """A plain function ``(module, query, key, value, attention_mask, scaling, dropout, q_pos, k_pos, **kwargs)`` as a
    ``LayerAttention`` (``PatchTarget.use_kernel``, deprecated)."""

    function: Callable
    handles: frozenset[str] = frozenset()
    fused_form: FusedAttention | None = None

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout, *, q_pos, k_pos, **kwargs):
        return self.function(module, query, key, value, attention_mask, scaling, dropout, q_pos, k_pos, **kwargs)

    def fused(self) -> FusedAttention | None:
        return self.fused_form


def fused_attention(plan: AttentionPlan, module: nn.Module, query, key, value, attention_mask, scaling, dropout,
                    q_pos: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """The layer through ``lce.kernels.attention.flash_attention`` (``[B, Tq, H, D]``), or None when the backend is
    the reference or the call is one the fused kernel does not cover (see the module docstring)."""
    if attention_mask is not None or dropout or kwargs.get("softcap") is not None:
        return None
    if resolve_backend(None, query, key, value) != "triton":
        return None
    fused = plan.fused
    pattern: dict = {"window": fused.window, "sink_tokens": fused.sink_tokens} if fused.window is not None else {}
    if plan.restriction is not None:
        restriction = plan.restriction.at(module, key.shape[2])
        if restriction is not None:
            if fused.window is not None:
                return None  # two patterns: the method's own window and the variant's (sinks refuses variants)
            pattern = restriction.kernel_pattern(int(q_pos.max()))
            if pattern is None:
                return None
    if fused.query_scale is not None:
        query = query * fused.query_scale(q_pos)[:, None, :, None].to(query.dtype)
    device = query.device
    spec = AttentionSpec(
        scale=float(scaling if scaling is not None else query.shape[-1] ** -0.5),
        segments=fused.segments, rotary=fused.rotary and _on(fused.rotary, device),
        alibi_slopes=None if fused.alibi_slopes is None else fused.alibi_slopes.to(device),
        logn_length=plan.logn_length, **{k: v.to(device) if isinstance(v, torch.Tensor) else v
                                         for k, v in pattern.items()},
    )
    k_pos = key_positions(q_pos, key.shape[2])
    return flash_attention(query, key, value, spec, q_pos, k_pos, backend="triton")


def _on(rotary, device: torch.device):
    """``rotary`` with its frequencies on ``device`` (the same object when they already are)."""
    if rotary.inv_freq.device == device:
        return rotary
    return type(rotary)(rotary.inv_freq.to(device), rotary.attention_scaling, rotary.style)


def register(name: str) -> str:
    """Register the dispatcher and the SDPA mask function under ``name`` (idempotent); returns ``name``."""
    AttentionInterface.register(name, lce_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
