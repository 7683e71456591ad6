"""Next-token loss from hidden states in chunks, so T x V logits are never materialised at once.

At long lengths the fp32 logits dominate memory (T=128k, V=128k: 64 GiB); scoring ``chunk_size`` rows at a time
bounds the workspace to ``chunk_size x V`` floats. Under autograd each chunk is recomputed in the backward pass
(activation checkpointing), so training memory is bounded the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_nll(logits_fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor):
    logits = logits_fn(hidden).float()
    return F.cross_entropy(logits, targets, reduction="none", ignore_index=-100)


def token_nll(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Per-token negative log-likelihood in nats.

    Args:
        logits_fn: maps hidden states ``[N, C]`` to logits ``[N, V]`` (e.g. ``lce.hf.lm.logits_from_hidden``).
        hidden: ``[N, C]`` hidden states whose next tokens are ``targets``.
        targets: ``[N]`` next-token ids; ``-100`` marks positions that are not scored (their NLL is 0).
        chunk_size: rows of logits alive at once.

    Returns:
        ``[N]`` float32 NLL per position.
    """
    if hidden.shape[:-1] != targets.shape or hidden.dim() != 2:
        raise ValueError(f"hidden [N, C] and targets [N] must match, got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_nll, logits_fn, h, t, use_reentrant=False))
        else:
            pieces.append(_chunk_nll(logits_fn, h, t))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def shifted_targets(input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Targets for next-token prediction: position t is scored on token t+1; the last position is not scored.

    ``[B, T] -> [B, T]`` with ``-100`` in the last column (and wherever ``labels`` is -100).
    """
    source = input_ids if labels is None else labels
    targets = torch.full_like(source, -100)
    targets[:, :-1] = source[:, 1:]
    return targets
