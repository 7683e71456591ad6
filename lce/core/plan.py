"""What a patched layer's attention does, as objects and data that neither transformers nor a method owns.

Each patched attention module carries an ``AttentionPlan`` (``module.lce_plan``), which lce's attention function
(``lce.hf.dispatch``, registered with transformers) reads on every call: log-n query scaling, the layer's
``LayerAttention`` (the position encoding's or attention variant's computation, or None for the model's own), a
sparse variant's ``Restriction``, and the layer as data for the fused Triton kernel (``FusedAttention``).

A ``LayerAttention`` is called in transformers' attention-function argument order (``module, query, key, value,
attention_mask, scaling, dropout``) plus the query and key positions, and declares what it handles beyond causal
softmax attention (``handles``): the patch refuses a model or a combination that needs more, instead of probing
signatures or computing it wrongly. It receives unrotated or rotated q/k depending on the method (see
``PatchTarget.rotate_in_attention``), boolean masks ``[B, 1, Tq, Tk]`` (or None for plain causal), and positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: Capabilities a ``LayerAttention`` declares in ``handles``. ``RESTRICTION``: it honours a sparse variant's pattern
#: passed as ``visible=``. ``SOFTCAP``: it soft-caps logits by ``kwargs["softcap"]`` (Gemma 2). ``BIDIRECTIONAL``: it
#: follows the module's ``is_causal`` (encoder models). ``RECURRENT_STATE``: it keeps a recurrent state in the KV
#: cache and receives the call's cache layer as ``state=`` (``lce.hf.cache``: a layer with ``recurrent_state`` and
#: ``keep_recurrent_state``, or ``NoCache`` when the module was called without a cache). ``HIDDEN_STATES``: it reads
#: the attention module's input ``[B, Tq, hidden]`` (NSA's gates), received as ``hidden_states=``.
RESTRICTION = "restriction"
SOFTCAP = "softcap"
BIDIRECTIONAL = "bidirectional"
RECURRENT_STATE = "recurrent_state"
HIDDEN_STATES = "hidden_states"


class LayerAttention:
    """One layer's attention computation (a position encoding's or an attention variant's).

    ``__call__(module, query, key, value, attention_mask, scaling, dropout, *, q_pos, k_pos, **kwargs) -> (out
    [B, Tq, H, D], weights | None)`` with ``query [B, H, Tq, D]``, ``key/value [B, HKV, Tk, D]``, ``q_pos [B, Tq]``,
    ``k_pos [B, Tk]``; ``kwargs`` are transformers' (``softcap``, ``position_ids``, ...) plus ``visible=`` (a
    ``Restriction`` or None) when ``RESTRICTION`` is handled, ``state=`` when ``RECURRENT_STATE`` is and
    ``hidden_states=`` when ``HIDDEN_STATES`` is.

    Attributes:
        handles: the capabilities above that this computation has.
    """

    handles: frozenset[str] = frozenset()

    def __call__(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None, dropout: float, *, q_pos: torch.Tensor,
                 k_pos: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def fused(self) -> FusedAttention | None:
        """The same layer as data for lce's fused Triton kernel, or None (this computation always runs)."""
        return None


@dataclass(frozen=True)
class NoCache:
    """The ``state=`` a ``RECURRENT_STATE`` computation receives when its module was called without a KV cache
    (``why``: where the cache was looked for, for the error when cached keys arrive anyway)."""

    why: str


#: ``(start, stop)`` half-open ranges of absolute key positions.
KeyRanges = list[tuple[int, int]]


class Restriction:
    """Which (query, key) pairs may attend: the pattern of a sparse attention variant, on absolute positions.

    Attention computations combine it with causality (``j <= i``) and the padding mask, so a restriction only says
    what else is hidden. Subclasses are frozen dataclasses (``lce.attention.sliding_window.SlidingWindowPattern``,
    ...) that implement ``visible`` and, to let computations skip keys, ``key_ranges``.

    Attributes:
        query_block: query rows lce's block-wise attention scores at once (position encodings that compute
            attention themselves use their own block size).
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
        cannot express it exactly (the PyTorch computation then runs)."""
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
        attention: the layer's ``LayerAttention``; None runs transformers' SDPA attention.
        q_scale: maps query positions ``[B, Tq]`` to per-query multipliers ``[B, Tq]`` (log-n scaling); None: 1.
        restriction: the sparse pattern of this layer, or None (every causal pair may attend). When set,
            ``attention`` handles ``RESTRICTION`` and receives ``restriction.at(module, kv_len)`` as ``visible=``.
        logn_length: the training length of log-n scaling when ``q_scale`` is log-n (the fused kernel scales in
            registers), else None.
        fused: the layer as data for the fused Triton kernel, or None (the PyTorch computation always runs).
    """

    attention: LayerAttention | None = None
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
