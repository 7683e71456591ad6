"""Token streams for training and fixed-length documents for evaluation, from any text source."""

from __future__ import annotations

import hashlib
from typing import Literal

import torch

from lce.data.tokenizer import Tokenizer
from lce.errors import ConfigError

POLICIES = ("long", "concat", "first")


def _stable_order(doc_id: str) -> bytes:
    return hashlib.sha256(doc_id.encode("utf-8")).digest()


def tokenized_documents(source, tokenizer: Tokenizer, split: str) -> list[tuple[str, torch.Tensor]]:
    """``(doc_id, ids[T])`` of one split, in a stable hash order of the ids (not alphabetical, not source order)."""
    docs = [(doc_id, tokenizer.encode(text)) for doc_id, text in source.documents(split)]
    return sorted(docs, key=lambda d: _stable_order(d[0]))


def token_stream(source, tokenizer: Tokenizer, split: str = "train") -> torch.Tensor:
    """All documents of ``split`` joined into one ``[L]`` int64 stream, each followed by ``eos_id``."""
    pieces = []
    eos = torch.tensor([tokenizer.eos_id], dtype=torch.int64)
    for _, ids in tokenized_documents(source, tokenizer, split):
        pieces += [ids, eos]
    if not pieces:
        raise ConfigError(f"data: the {split!r} split of data={source.name} is empty")
    return torch.cat(pieces)


def eval_documents(
    source,
    tokenizer: Tokenizer,
    min_tokens: int,
    n_docs: int,
    split: str = "test",
    policy: Literal["long", "concat", "first"] = "long",
) -> list[torch.Tensor]:
    """``n_docs`` token sequences of at least ``min_tokens`` tokens (the longest eval length).

    ``long``: whole documents that are at least that long, so every window is one real document (the first
    ``n_docs`` in the stable hash order, which no source's ordering or sharding changes). ``first``: the first
    ``n_docs`` such documents in the source's own order (a hub dataset's row order; sorted relative paths for files),
    as YaRN's ``eval/perplexity.py`` selects them (``filter(tokenized_len >= --dataset-min-tokens)`` then
    ``[:--samples]``; its Table 2 reads the first 10 Proof-pile test documents of at least 131072 tokens); reading
    stops at the last one needed. ``concat``: the split's documents joined with ``eos_id`` and cut into ``n_docs``
    consecutive pieces of ``min_tokens`` tokens, for corpora whose documents are short.
    """
    if policy in ("long", "first"):
        if policy == "long":
            candidates = (ids for _, ids in tokenized_documents(source, tokenizer, split))
        else:
            candidates = (tokenizer.encode(text) for _, text in source.documents(split))
        docs, longest = [], 0
        for ids in candidates:
            longest = max(longest, ids.numel())
            if ids.numel() >= min_tokens:
                docs.append(ids)
                if len(docs) == n_docs:
                    return docs
        if not docs:
            raise ConfigError(
                f"eval.lengths: no document of the {split!r} split of data={source.name} has {min_tokens} tokens (the "
                f"longest evaluation length, or eval.min_doc_tokens); the longest has {longest}; lower the lengths or "
                "set eval.documents=concat"
            )
        raise ConfigError(
            f"eval.n_docs: only {len(docs)} documents of the {split!r} split of data={source.name} have at least "
            f"{min_tokens} tokens (the longest eval length), {n_docs} requested; lower eval.n_docs or the lengths, "
            f"or set eval.documents=concat"
        )
    if policy == "concat":
        stream = token_stream(source, tokenizer, split)
        if stream.numel() < min_tokens:
            raise ConfigError(
                f"eval.lengths: the {split!r} split of data={source.name} has {stream.numel()} tokens in all, fewer "
                f"than the longest evaluation length {min_tokens}; lower the lengths"
            )
        if stream.numel() < n_docs * min_tokens:
            raise ConfigError(
                f"eval.n_docs: the {split!r} split of data={source.name} has {stream.numel()} tokens, fewer than "
                f"n_docs x longest length = {n_docs} x {min_tokens}; lower eval.n_docs or the lengths"
            )
        return [stream[i * min_tokens : (i + 1) * min_tokens].clone() for i in range(n_docs)]
    raise ConfigError(f"eval.documents: {policy!r} is not allowed; choose one of {', '.join(map(repr, POLICIES))}")
