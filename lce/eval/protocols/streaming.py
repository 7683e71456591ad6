"""``streaming``: StreamingLLM's ``eval_long_ppl.py`` (arXiv:2309.17453), token by token with a KV cache that keeps
the first and the most recent entries (``lce.eval.streaming``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from lce.config import check
from lce.eval.perplexity import NllFn, document_nll, point_score
from lce.eval.protocols.registry import PROTOCOLS, Protocol
from lce.eval.protocols.windows import documents_after_start
from lce.eval.score import ProtocolScore
from lce.eval.streaming import streaming_nll_fn


@PROTOCOLS.register("streaming")
@dataclass(frozen=True)
class StreamingProtocol(Protocol):
    """StreamingLLM's ``examples/eval_long_ppl.py`` (mit-han-lab/streaming-llm): token-by-token perplexity with a KV
    cache that keeps the first ``start_size`` and the most recent entries (``lce.eval.streaming``).

    - Each document is fed one token at a time from an empty cache, no prefill; the logits of every step score the
      next token. At length L a document contributes its first ``L - 1`` predictions: the script's
      ``--num_eval_tokens L-1``. A BOS token comes first (``add_start_token``; None: iff ``bos_id`` is given, as the
      script's Llama tokenizer adds one), so the window is ``BOS + doc[:L-1]``, else ``doc[:L]``.
    - ``recent_size`` bounds the cache (``--enable_start_recent_kv_cache``): the token fed at a step attends the
      first ``start_size`` and the last ``recent_size`` entries (the current token included, as in
      ``posenc=sinks``: the script's ``--recent_size r`` is ``r + 1`` here); None keeps every entry, and the NLL
      equals a full forward's. Positions are the places in the cache: with ``posenc=sinks`` this is the pos-shift
      variant (``--enable_pos_shift``) and equals the sinks model's full forward; for a model that caches rotated
      keys it is the script without pos-shift.
    - Aggregation: token-weighted (the script's ``exp(mean(nlls))`` over single-token steps), with per-position
      buckets as ``canonical`` has.

    The script carries one cache across documents and never feeds a document's last token; here each document is
    its own stream, so with one document (``--num_samples 1``, the script's default) at least ``L - 1`` tokens long
    the two agree exactly, and several documents are scored independently and summed. The cost is ``L - 1`` forwards
    of one token per document: meant for a few documents.

    Attributes:
        start_size: first entries every step keeps (the attention sinks; the script's PPL default is 1, the
            paper's 4).
        recent_size: most recent entries attended, the current token included; None: no eviction.
        add_start_token: None: a BOS iff ``bos_id`` is given.
        bucket_size: predicting positions per bucket; None: one bucket (the training length under ``lce``).
    """

    name: str = "streaming"
    start_size: int = 4
    recent_size: int | None = None
    add_start_token: bool | None = None
    bucket_size: int | None = None

    input: ClassVar[str] = "documents"

    def __post_init__(self):
        check(self.start_size >= 0, "protocol.start_size", f"must be >= 0, got {self.start_size}")
        check(self.recent_size is None or self.recent_size >= 1, "protocol.recent_size",
              f"must be >= 1 (the current token) or null for no eviction, got {self.recent_size}")
        check(self.bucket_size is None or self.bucket_size >= 1, "protocol.bucket_size",
              f"must be >= 1, got {self.bucket_size}")

    def model_nll_fn(self, model, chunk_size: int = 4096, device=None) -> NllFn:
        """Token-by-token NLL with this protocol's cache (``chunk_size`` is moot: one row of logits per step)."""
        return streaming_nll_fn(model, self.start_size, self.recent_size, device)

    def with_bucket_size(self, size: int) -> Protocol:
        return self if self.bucket_size is not None else dataclasses.replace(self, bucket_size=size)

    def score(
        self, nll_fn: NllFn, data, length: int, *, bos_id: int | None = None, batch_size: int = 1
    ) -> ProtocolScore:
        """Score ``data`` (documents) with the first ``length - 1`` predictions of each."""
        docs, prefix, doc_tokens = documents_after_start(data, length, self.add_start_token, bos_id, "streamed")
        if prefix is not None:
            docs = [torch.cat([prefix, doc[:doc_tokens]]) for doc in docs]
        position_nll, _ = document_nll(nll_fn, docs, length, batch_size)
        return dataclasses.replace(point_score(position_nll, len(docs), self.bucket_size or length),
                                   protocol=self.name)
