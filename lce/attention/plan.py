"""lce's attention function: one dispatcher registered with transformers, per-layer plans stored on the modules.

transformers looks attention functions up by name in a process-wide registry (``AttentionInterface``), so lce
registers one stateless dispatcher under ``lce_<name>`` names; what a layer does lives on that layer's attention
module (``module.lce_plan``), so two models in one process never share state. Every name is registered with the
SDPA mask function too (``AttentionMaskInterface``): without it transformers passes ``attention_mask=None`` to a custom
attention function and padding is silently ignored.

A plan scales queries by position (log-n) and then runs its kernel, or transformers' SDPA attention when it has
none. Kernels receive unrotated or rotated q/k depending on the method (see ``PatchTarget.rotate_in_attention``),
boolean masks ``[B, 1, Tq, Tk]`` (or None for plain causal), and query and key positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Kernel = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class AttentionPlan:
    """What lce's attention function does in one layer.

    Attributes:
        kernel: ``kernel(module, query, key, value, attention_mask, scaling, dropout, q_pos, k_pos, **kwargs) ->
            (out [B, Tq, H, D], weights | None)`` with ``query [B, H, Tq, D]``, ``key/value [B, HKV, Tk, D]``,
            ``q_pos [B, Tq]``, ``k_pos [B, Tk]``; None runs transformers' SDPA attention.
        q_scale: maps query positions ``[B, Tq]`` to per-query multipliers ``[B, Tq]`` (log-n scaling); None: 1.
    """

    kernel: Kernel | None = None
    q_scale: Callable[[torch.Tensor], torch.Tensor] | None = None


def query_positions(query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``[B, Tq]`` query positions: ``position_ids`` when the layer passes them, else the last ``Tq`` of ``Tk``."""
    positions = kwargs.get("position_ids")
    batch, _, tq, _ = query.shape
    if positions is None:
        positions = torch.arange(key.shape[2] - tq, key.shape[2], device=query.device)[None]
    return positions.expand(batch, tq)


def key_positions(q_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """``[B, Tk]`` key positions, aligned so the newest key sits at the newest query's position.

    Cached keys are the contiguous tokens before the current ones; under left padding the pad keys get positions
    below 0, and the mask hides them.
    """
    return q_pos[:, -1:] - (kv_len - 1) + torch.arange(kv_len, device=q_pos.device)


def lce_attention_forward(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function transformers calls for ``attn_implementation="lce_<name>"``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan: AttentionPlan = module.lce_plan
    q_pos = query_positions(query, key, kwargs)
    if plan.q_scale is not None:
        query = query * plan.q_scale(q_pos)[:, None, :, None].to(query.dtype)
    if plan.kernel is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    k_pos = key_positions(q_pos, key.shape[2])
    return plan.kernel(module, query, key, value, attention_mask, scaling, dropout, q_pos, k_pos, **kwargs)


def register(name: str) -> str:
    """Register the dispatcher and the SDPA mask function under ``name`` (idempotent); returns ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, lce_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
