"""Perplexity of a causal LM on documents truncated to one length, with per-position NLL buckets.

Every document is cut to its first ``length`` tokens and scored as one window: positions ``t = 0 .. length-2``
predict tokens ``t+1``, so a window yields ``length-1`` predictions. NLL is summed over all predictions of all
documents in float64 and divided by the number of predictions once, as nanoGPT's ``evaluate_bpb`` does: a mean of
per-window (or per-document) means weights each prediction by one over the size of its window, which is not the
per-token perplexity that long-context papers report, and makes results depend on how documents were batched or cut.

The per-position buckets show *where* in the window the loss grows: bucket ``k`` holds the predictions made at
positions ``t`` with ``t // bucket_size == k`` (``t`` is the 0-based index of the predicting token, so bucket 0 is
the first ``bucket_size`` predictions). The last bucket may be smaller.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lce.config import check
from lce.deprecated import renamed
from lce.errors import ConfigError
from lce.eval.loss import shifted_targets, token_nll
from lce.eval.score import ProtocolScore
from lce.hf.lm import hidden_states, loss_head


def check_documents(docs: list[torch.Tensor], length: int) -> None:
    """Raise ``ConfigError`` unless every document is a 1-D integer tensor with at least ``length`` tokens."""
    check(len(docs) > 0, "docs", "no documents to score")
    for i, doc in enumerate(docs):
        if doc.dim() != 1 or doc.is_floating_point():
            raise ConfigError(f"docs[{i}]: expected a 1-D tensor of token ids, got {doc.dtype} {tuple(doc.shape)}")
        if doc.numel() < length:
            raise ConfigError(f"docs[{i}]: has {doc.numel()} tokens, fewer than the evaluation length {length}")


NllFn = Callable[[torch.Tensor], torch.Tensor]


def model_nll_fn(model: nn.Module, chunk_size: int = 4096, device: torch.device | str | None = None) -> NllFn:
    """Wrap a causal LM as ``nll_fn(input_ids [B, T]) -> [B, T-1]``: the float32 NLL (nats) of token ``t+1`` given
    tokens ``0..t``, from ``lce.hf.lm.hidden_states`` and chunked logits (never ``T x V`` at once).

    The model runs on all ``T`` tokens, the last included although it is only a target: methods whose rotation
    depends on the input length (dynamic NTK) must see the evaluation length. Runs under ``torch.inference_mode``;
    the result stays on ``device``.

    Args:
        model: a causal LM supported by ``lce.hf.adapters``.
        chunk_size: rows of logits materialised at once (see ``lce.eval.loss.token_nll``).
        device: where to run; ``None`` means the device of the model's parameters.
    """
    check(chunk_size >= 1, "chunk_size", f"must be at least 1, got {chunk_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    head = loss_head(model)

    def nll_fn(input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise ValueError(f"input_ids must be [B, T] with T >= 2, got {tuple(input_ids.shape)}")
        ids = input_ids.to(device)
        with torch.inference_mode():
            hidden = hidden_states(model, ids)  # [B, T, C]
            nll = token_nll(head, hidden.flatten(0, 1), shifted_targets(ids).flatten(), chunk_size)
        # The last position has no target (its NLL is 0 by ignore_index): dropped, not counted.
        return nll.view(ids.shape)[:, :-1]

    return nll_fn


def document_nll(
    nll_fn: NllFn, docs: list[torch.Tensor], length: int, batch_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL of ``docs`` each truncated to their first ``length`` tokens, summed two ways.

    Returns:
        ``(position_nll, doc_nll)``: float64 CPU tensors ``[length - 1]`` (summed over documents, per predicting
        position) and ``[n_docs]`` (summed over positions, per document).
    """
    check(length >= 2, "length", f"must be at least 2 to score one prediction, got {length}")
    check(batch_size >= 1, "batch_size", f"must be at least 1, got {batch_size}")
    check_documents(docs, length)
    # Summing per position (rather than per bucket) keeps the bucket boundaries out of the hot loop.
    position_nll = torch.zeros(length - 1, dtype=torch.float64)
    doc_nll = []
    for start in range(0, len(docs), batch_size):
        ids = torch.stack([doc[:length] for doc in docs[start : start + batch_size]])  # [B, T]
        nll = nll_fn(ids).double().cpu()  # [B, T-1]
        position_nll += nll.sum(0)
        doc_nll.append(nll.sum(1))
    return position_nll, torch.cat(doc_nll)


def point_score(position_nll: torch.Tensor, n_docs: int, bucket_size: int | None = None) -> ProtocolScore:
    """The token-weighted ``canonical`` score of per-position NLL sums over ``n_docs`` windows, with buckets
    (``bucket_size`` None: one bucket)."""
    bucket_size = position_nll.numel() + 1 if bucket_size is None else bucket_size
    check(bucket_size >= 1, "bucket_size", f"must be at least 1, got {bucket_size}")
    buckets = position_nll.split(bucket_size)
    return ProtocolScore(
        nll_sum=position_nll.sum().item(),
        tokens=n_docs * position_nll.numel(),
        bucket_size=bucket_size,
        bucket_nll=[b.sum().item() for b in buckets],
        bucket_tokens=[n_docs * b.numel() for b in buckets],
        windows=n_docs,
    )


def score_documents(
    model: nn.Module,
    docs: list[torch.Tensor],
    length: int,
    *,
    batch_size: int = 1,
    chunk_size: int = 4096,
    bucket_size: int | None = None,
    device: torch.device | str | None = None,
) -> ProtocolScore:
    """Summed next-token NLL of ``docs`` each truncated to their first ``length`` tokens.

    This is the ``canonical`` protocol of ``lce.eval.protocols`` without its confidence interval.

    Args:
        model: a causal LM supported by ``lce.hf.adapters``.
        docs: 1-D int64 tensors ``[T_i]`` with ``T_i >= length``.
        length: window length; each window scores ``length - 1`` predictions.
        batch_size: windows per forward pass (the result does not depend on it beyond float rounding).
        chunk_size: rows of logits materialised at once (see ``lce.eval.loss.token_nll``).
        bucket_size: predicting positions per bucket; ``None`` means one bucket for the whole window.
        device: where to run; ``None`` means the device of the model's parameters.

    Returns:
        The summed NLL, token count and per-position buckets.
    """
    check(length >= 2, "length", f"must be at least 2 to score one prediction, got {length}")
    check(batch_size >= 1, "batch_size", f"must be at least 1, got {batch_size}")
    check(bucket_size is None or bucket_size >= 1, "bucket_size", f"must be at least 1, got {bucket_size}")
    nll_fn = model_nll_fn(model, chunk_size, device)
    position_nll, _ = document_nll(nll_fn, docs, length, batch_size)
    return point_score(position_nll, len(docs), length if bucket_size is None else bucket_size)


# A deprecated name of the one result type, kept for callers of lce 0.1.0: ``ProtocolScore`` takes PointScore's
# arguments (nll_sum, tokens, bucket_size, bucket_nll, bucket_tokens) in the same order.
__getattr__ = renamed(__name__, {"PointScore": "lce.eval.score.ProtocolScore"})
