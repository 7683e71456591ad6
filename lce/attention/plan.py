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
does not declare that it handles restrictions (``RESTRICTION`` in ``PatchTarget.use_kernel``'s ``handles``) is
refused when the model is patched, never silently unrestricted.

Backends: a plan may also describe its layer as data (``FusedAttention``), which ``lce.kernels.attention``'s one-pass
Triton kernel computes. The dispatcher runs that kernel when the backend resolves to ``triton`` (``auto`` on CUDA,
``LCE_BACKEND``, or a run's ``backend`` field; see ``lce.kernels.backend``) and the call is one the kernel covers: no
padding mask (transformers passes None for unpadded causal batches), no attention dropout, no logit soft-cap, and a
restriction that has a kernel form (``Restriction.kernel_pattern``). Every other call runs the plan's PyTorch
kernel, so choosing a backend never changes what is computed, only how.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Kernel = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]

#: The capability a kernel declares (``PatchTarget.use_kernel(handles=...)``) when it honours a ``Restriction`` passed
#: as ``visible=``.
RESTRICTION = "restriction"

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

    def kernel_pattern(self, max_position: int) -> dict | None:
        """This pattern as fields of ``lce.kernels.attention.AttentionSpec`` (``window``, ``sink_tokens``,
        ``block_mask`` + ``block_size``) covering positions up to ``max_position``; None when the fused kernel
        cannot express it exactly (the PyTorch kernel then runs)."""
        return None

    def at(self, module: nn.Module, kv_len: int) -> Restriction | None:
        """The restriction in force for one call of ``module`` over ``kv_len`` keys; None = unrestricted (e.g. S²-Attn
        outside training). Patterns that do not depend on the call return themselves."""
        return self

    def __call__(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.visible(i, j)


@dataclass(frozen=True, eq=False)
class FusedAttention:
    """A layer's attention as data for ``lce.kernels.attention.flash_attention`` (its ``AttentionSpec`` fields that
    are fixed when the model is patched; the scale, log-n and the restriction are added per call).

    Attributes:
        segments: ``lce.kernels.attention.spec.Segment`` tuple; empty: q and k arrive rotated (or carry no rotation).
        rotary: the ``Rotation`` the segments rotate with (None without segments).
        alibi_slopes: ``[H]`` fp32 ALiBi slopes, or None.
        window, sink_tokens: a pattern the method itself imposes (StreamingLLM's sinks + recent window), or None/0.
        query_scale: ``q_pos [B, Tq] -> [B, Tq]`` multiplier applied to queries before the kernel (DCA's mscale), or
            None.
    """

    segments: tuple = ()
    rotary: Any = None
    alibi_slopes: torch.Tensor | None = None
    window: int | None = None
    sink_tokens: int = 0
    query_scale: Callable[[torch.Tensor], torch.Tensor] | None = None


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
        logn_length: the training length of log-n scaling when ``q_scale`` is log-n (the fused kernel scales in
            registers), else None.
        fused: the layer as data for the fused kernel, or None (the PyTorch kernel always runs).
    """

    kernel: Kernel | None = None
    q_scale: Callable[[torch.Tensor], torch.Tensor] | None = None
    restriction: Restriction | None = None
    logn_length: int | None = None
    fused: FusedAttention | None = None


def query_positions(query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``[B, Tq]`` query positions: ``position_ids`` when the layer passes them, else the last ``Tq`` of ``Tk``."""
    positions = kwargs.get("position_ids")
    batch, _, tq, _ = query.shape
    if positions is None:
        positions = torch.arange(key.shape[2] - tq, key.shape[2], device=query.device)[None]
    return positions.expand(batch, tq)


def key_positions(q_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """``[B, Tk]`` key positions: the last ``Tq`` keys are this call's tokens, at the queries' own positions (which may
    jump: PoSE's skipped positions, packed documents restarting at 0); cached keys before them are taken as the
    contiguous run of positions preceding the first query (under left padding the pad keys get positions below 0, and
    the mask hides them).
    """
    tq = q_pos.shape[1]
    if kv_len <= tq:
        return q_pos[:, tq - kv_len:]
    cached = q_pos[:, :1] - (kv_len - tq) + torch.arange(kv_len - tq, device=q_pos.device)
    return torch.cat([cached, q_pos], dim=1)


def lce_attention_forward(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function transformers calls for ``attn_implementation="lce_<name>"``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan: AttentionPlan = module.lce_plan
    q_pos = query_positions(query, key, kwargs)
    if plan.fused is not None:
        out = fused_attention(plan, module, query, key, value, attention_mask, scaling, dropout, q_pos, kwargs)
        if out is not None:
            return out, None
    if plan.q_scale is not None:
        query = query * plan.q_scale(q_pos)[:, None, :, None].to(query.dtype)
    if plan.kernel is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    k_pos = key_positions(q_pos, key.shape[2])
    if plan.restriction is not None:
        kwargs["visible"] = plan.restriction.at(module, key.shape[2])
    return plan.kernel(module, query, key, value, attention_mask, scaling, dropout, q_pos, k_pos, **kwargs)


def fused_attention(plan: AttentionPlan, module: nn.Module, query, key, value, attention_mask, scaling, dropout,
                    q_pos: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """The layer through ``lce.kernels.attention.flash_attention`` (``[B, Tq, H, D]``), or None when the backend is
    the reference or the call is one the fused kernel does not cover (see the module docstring)."""
    from lce.kernels.backend import resolve_backend

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
    from lce.kernels.attention import AttentionSpec, flash_attention

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
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, lce_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
