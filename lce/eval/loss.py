"""Next-token loss from hidden states, without ever materialising T x V logits.

Given the model's logit head as data (``lce.kernels.cross_entropy.LogitHead``, from
``lce.hf.adapters.Adapter.logit_head``), the loss is ``lce.kernels.cross_entropy.linear_cross_entropy``: on CUDA
logits one chunk of rows at a time (cuBLAS) with a fused Triton loss-and-gradient kernel, never N x V; the chunked
reference elsewhere (``lce.kernels.backend`` decides).
Any other callable ``hidden -> logits`` is scored by the same chunked reference: ``chunk_size`` rows of logits at a
time, each chunk recomputed in the backward pass, so memory is bounded by ``chunk_size x V`` logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lce.errors import ConfigError
from lce.kernels.cross_entropy import LogitHead, linear_cross_entropy, linear_cross_entropy_ref


def token_nll(
    logits_fn: LogitHead | Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Per-token negative log-likelihood in nats.

    Args:
        logits_fn: the model's ``LogitHead`` (fused path), or any callable mapping hidden states ``[N, C]`` to logits
            ``[N, V]`` (e.g. ``partial(lce.hf.lm.logits_from_hidden, model)``).
        hidden: ``[N, C]`` hidden states whose next tokens are ``targets``.
        targets: ``[N]`` next-token ids; ``-100`` marks positions that are not scored (their NLL is 0).
        chunk_size: rows of logits alive at once on the reference path.

    Returns:
        ``[N]`` float32 NLL per position.
    """
    if hidden.shape[:-1] != targets.shape or hidden.dim() != 2:
        raise ValueError(f"hidden [N, C] and targets [N] must match, "
                         f"got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be at least 1, got {chunk_size}")
    if isinstance(logits_fn, LogitHead):
        return linear_cross_entropy(hidden, logits_fn, targets, chunk_size=chunk_size)
    return linear_cross_entropy_ref(hidden, logits_fn, targets, chunk_size)


def shifted_targets(input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Targets for next-token prediction: position t is scored on token t+1; the last position is not scored.

    ``[B, T] -> [B, T]`` with ``-100`` in the last column (and wherever ``labels`` is -100).
    """
    source = input_ids if labels is None else labels
    targets = torch.full_like(source, -100)
    targets[:, :-1] = source[:, 1:]
    return targets
