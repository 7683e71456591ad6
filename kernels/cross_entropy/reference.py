"""Per-token cross-entropy of a linear logit head, in plain PyTorch, ``chunk_size`` rows of logits at a time.

For hidden states ``h [N, C]`` and head ``(W [V, C], b [V], m, c)`` (``lce.kernels.cross_entropy.head``):

    z   = c * tanh(m * (h W^T + b) / c)              (no tanh when the head has no soft-cap)
    nll = logsumexp(z) - z[target]                   (= -log softmax(z)[target]; 0 where target == -100)

(the loss that Cut Cross-Entropy, Wijmans et al. 2024, arXiv:2411.09009, computes without materialising ``z``).
This is the readable definition the Triton kernels are tested against, and the exact computation lce has always used
(``lce.eval.loss``): logits are formed in the head's dtype by the head's own operations, as the model's forward
forms them, then the loss is taken in fp32 by ``F.cross_entropy``. Any callable ``[n, C] -> [n, V]`` works as the
head (``lce.eval.loss.token_nll``'s generic path for heads that are not a ``LogitHead``).

At long lengths the fp32 logits dominate memory (T=128k, V=128k: 64 GiB); at most ``chunk_size x V`` logits are
alive at once. When autograd is on, each chunk is recomputed in the backward pass (activation checkpointing), so
training memory is bounded the same way, whichever of hidden states and head parameters require gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lce.kernels.cross_entropy.head import LogitHead

IGNORE_INDEX = -100

#: A head: a ``LogitHead`` or any callable ``[n, C] -> [n, V]`` logits.
Head = LogitHead | Callable[[torch.Tensor], torch.Tensor]


def _chunk_nll(head: Head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # [n, V]
    return F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE_INDEX)


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    head: Head,
    targets: torch.Tensor,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Per-token NLL in nats from hidden states, ``chunk_size`` rows at a time.

    Args:
        hidden: ``[N, C]`` hidden states.
        head: the logit head (``[V, C]`` weight), or any callable mapping ``[n, C]`` to ``[n, V]`` logits.
        targets: ``[N]`` token ids in ``[0, V)``, or ``-100`` for positions that are not scored (NLL 0).
        chunk_size: rows of logits alive at once.

    Returns:
        ``[N]`` float32 NLL per position.
    """
    pieces = []
    # N = 0 still runs one (empty) chunk, so the result is connected to autograd like any other.
    for start in range(0, max(hidden.shape[0], 1), chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        # Whenever autograd records, not only when hidden requires grad: the head's parameters may (a frozen trunk
        # under a trained head), and a chunk in which nothing requires grad records nothing anyway.
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_nll, head, h, t, use_reentrant=False))
        else:
            pieces.append(_chunk_nll(head, h, t))
    return torch.cat(pieces)
