"""What the protocols share: their input (documents or one stream, with an optional start token), strided windows,
and scoring windows in batches through ``nll_fn``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from lce.config import check
from lce.errors import ConfigError
from lce.eval.perplexity import NllFn
from lce.eval.score import ProtocolScore


def check_ids(ids: Any, where: str) -> torch.Tensor:
    """``ids`` if it is a 1-D tensor of token ids, else a ``ConfigError`` naming ``where``."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ConfigError(f"{where}: expected a 1-D tensor of token ids, got {getattr(ids, 'dtype', '')} {shape}")
    return ids


def as_documents(data: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """Documents: a list of 1-D token tensors (a single tensor is one document)."""
    docs = [data] if isinstance(data, torch.Tensor) else list(data)
    check(len(docs) > 0, "docs", "no documents to score")
    return [check_ids(doc, f"docs[{i}]") for i, doc in enumerate(docs)]


def as_stream(data: torch.Tensor | list[torch.Tensor], max_tokens: int | None) -> torch.Tensor:
    """One token stream: a 1-D tensor, or documents joined as they are (no separator, no BOS)."""
    if isinstance(data, torch.Tensor):
        stream = check_ids(data, "stream")
    else:
        docs = as_documents(data)
        stream = torch.cat(docs)
    return stream if max_tokens is None else stream[:max_tokens]


def start_token(add_start_token: bool | None, bos_id: int | None, where: str) -> int | None:
    """The token put before each window (or the stream), or None: ``add_start_token`` None means iff ``bos_id``."""
    if add_start_token is False:
        return None
    if add_start_token and bos_id is None:
        raise ConfigError(f"{where}: add_start_token=true needs a bos_id (the tokenizer has none: set it to false)")
    return bos_id


def documents_after_start(data, length: int, add_start_token: bool | None, bos_id: int | None,
                           purpose: str) -> tuple[list[torch.Tensor], torch.Tensor | None, int]:
    """The documents of ``data``, the start-token prefix (None without one) and how many document tokens a window of
    ``length`` holds after it; a document shorter than that is an error naming it (``purpose``: what they are for)."""
    check_length(length)
    docs = as_documents(data)
    start = start_token(add_start_token, bos_id, "protocol.add_start_token")
    doc_tokens = length - 1 if start is not None else length
    for i, doc in enumerate(docs):
        if doc.numel() < doc_tokens:
            raise ConfigError(f"docs[{i}]: has {doc.numel()} tokens, fewer than the {doc_tokens} {purpose}")
    prefix = None if start is None else torch.tensor([start], dtype=docs[0].dtype)
    return docs, prefix, doc_tokens


def run_windows(
    nll_fn: NllFn, windows: Iterable[tuple[torch.Tensor, Any]], batch_size: int
) -> Iterator[tuple[torch.Tensor, Any]]:
    """``(nll [T-1] float64 CPU, tag)`` per window, in order; consecutive windows of equal length share a forward."""
    check(batch_size >= 1, "batch_size", f"must be at least 1, got {batch_size}")
    pending: list[tuple[torch.Tensor, Any]] = []

    def flush() -> list[tuple[torch.Tensor, Any]]:
        ids = torch.stack([w for w, _ in pending])
        nll = nll_fn(ids)
        if tuple(nll.shape) != (ids.shape[0], ids.shape[1] - 1):
            raise ValueError(f"nll_fn must map [B, T] = {tuple(ids.shape)} to [B, T-1], got {tuple(nll.shape)}")
        nll = nll.detach().double().cpu()
        out = [(nll[i], tag) for i, (_, tag) in enumerate(pending)]
        pending.clear()
        return out

    for ids, tag in windows:
        if pending and (len(pending) == batch_size or pending[0][0].numel() != ids.numel()):
            yield from flush()
        pending.append((ids, tag))
    if pending:
        yield from flush()


def score_new_tokens(protocol: str, scored: Iterable[tuple[torch.Tensor, int]]) -> ProtocolScore:
    """Token-weighted score of windows that each count only their last ``new`` predictions (those no earlier window
    scored), as ``sliding`` and ``fairseq`` do; ``scored`` is ``run_windows``'s ``(nll, new)`` per window."""
    nll_sum, count, n_windows = 0.0, 0, 0
    for nll, new in scored:
        # A first window counts all of its predictions: new (its tokens) exceeds them by one.
        tail = nll[-min(new, nll.numel()):]
        nll_sum, count, n_windows = nll_sum + tail.sum().item(), count + tail.numel(), n_windows + 1
    return ProtocolScore(nll_sum, count, protocol=protocol, windows=n_windows)


def strided_windows(n: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """``(begin, end, new)`` of the strided loop of HF's perplexity guide and YaRN's ``compute_perplexity``.

    Windows ``[begin, min(begin + window, n))`` start every ``stride`` tokens and stop once one reaches ``n``;
    ``new = end - previous end`` counts the tokens the previous window did not cover (the whole window for the
    first; more than the window when ``stride > window``, whose gaps are then never scored).
    """
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        yield begin, end, end - prev_end
        prev_end = end
        if end == n:
            break


def check_length(length: int) -> None:
    check(isinstance(length, int) and length >= 2, "length", f"must be an integer >= 2, got {length!r}")
