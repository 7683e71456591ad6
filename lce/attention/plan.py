"""lce's attention function: one dispatcher registered with transformers, per-layer plans stored on the modules.

transformers looks attention functions up by name in a process-wide registry (``AttentionInterface``), so lce
registers one stateless dispatcher under ``lce_<name>`` names; what a layer does lives on that layer's attention
module (``module.lce_plan``), so two models in one process never share state. Every name is registered with the
SDPA mask function too (``AttentionMaskInterface``): without it transformers passes ``attention_mask=None`` to a custom
attention function and padding is silently ignored.

A plan scales queries by position (log-n) and then runs its kernel, or transformers' SDPA attention when it has
none. Kernels receive unrotated or rotated q/k depending on the method (see ``PatchTarget.rotate_in_attention``),
boolean masks ``[B, 1, Tq, Tk]`` (or None for plain causal), and query and key positions.

A sparse attention variant adds a ``Restriction`` to the plan of the layers it selects: which (query, key) pairs may
attend, as a predicate on absolute positions plus a block map. The dispatcher hands it to the layer's kernel as
``visible=`` (the position encoding's kernel, or lce's block-wise kernel when the encoding has none); a kernel that
takes no ``visible`` argument is refused when the model is patched (``accepts_visible``), never silently unrestricted.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Kernel = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]

#: ``(start, stop)`` half-open ranges of absolute key positions.
KeyRanges = list[tuple[int, int]]


class Restriction:
    """Which (query, key) pairs may attend: the pattern of a sparse attention variant, on absolute positions.

    Kernels combine it with causality (``j <= i``) and the padding mask, so a restriction only says what else is
    hidden. Subclasses are frozen dataclasses (``lce.attention.sliding_window.SlidingWindowPattern``, ...) that
    implement ``visible`` and, to let kernels skip keys, ``key_ranges``.

    Attributes:
        query_block: query rows lce's block-wise kernel scores at once (kernels of position encodings use their own
            block size).
    """

    query_block: int = 128

    def visible(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """The predicate: query positions ``i [B, Tq, 1]``, key positions ``j [B, 1, Tk]`` -> bool ``[B, Tq, Tk]``
        (or ``[B, H, Tq, Tk]`` for patterns that differ per query head). Pairs with ``j > i`` may be anything."""
        raise NotImplementedError

    def key_ranges(self, q_lo: int, q_hi: int) -> KeyRanges | None:
        """The block map: ranges of key positions that hold every key visible to some query with a position in
        ``[q_lo, q_hi]``; keys outside them are never scored. None: any key up to ``q_hi`` may be visible."""
        return None

    def at(self, module: nn.Module, kv_len: int) -> Restriction | None:
        """The restriction in force for one call of ``module`` over ``kv_len`` keys; None = unrestricted (e.g. S²-Attn
        outside training). Patterns that do not depend on the call return themselves."""
        return self

    def __call__(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.visible(i, j)


@dataclass(frozen=True)
class AttentionPlan:
    """What lce's attention function does in one layer.

    Attributes:
        kernel: ``kernel(module, query, key, value, attention_mask, scaling, dropout, q_pos, k_pos, **kwargs) ->
            (out [B, Tq, H, D], weights | None)`` with ``query [B, H, Tq, D]``, ``key/value [B, HKV, Tk, D]``,
            ``q_pos [B, Tq]``, ``k_pos [B, Tk]``; None runs transformers' SDPA attention.
        q_scale: maps query positions ``[B, Tq]`` to per-query multipliers ``[B, Tq]`` (log-n scaling); None: 1.
        restriction: the sparse pattern of this layer, or None (every causal pair may attend). When set, ``kernel``
            is not None and takes a ``visible`` keyword: it receives ``restriction.at(module, kv_len)``.
    """

    kernel: Kernel | None = None
    q_scale: Callable[[torch.Tensor], torch.Tensor] | None = None
    restriction: Restriction | None = None


def accepts_visible(kernel: Kernel) -> bool:
    """Whether ``kernel`` declares a ``visible`` parameter (swallowing it in ``**kwargs`` does not count: such a kernel
    would compute unrestricted attention)."""
    try:
        parameter = inspect.signature(kernel).parameters.get("visible")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


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
    if plan.restriction is not None:
        kwargs["visible"] = plan.restriction.at(module, key.shape[2])
    return plan.kernel(module, query, key, value, attention_mask, scaling, dropout, q_pos, k_pos, **kwargs)


def register(name: str) -> str:
    """Register the dispatcher and the SDPA mask function under ``name`` (idempotent); returns ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, lce_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
