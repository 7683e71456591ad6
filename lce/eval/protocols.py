"""Perplexity protocols: how windows are cut, which predictions count, and how their NLL is averaged.

Published long-context perplexities differ in all three, so numbers from different papers only compare when the
protocol is reproduced exactly. Each protocol here is a registered, typed config (``PROTOCOLS``; the key is the
``name`` written into results) whose ``score`` method implements one published convention:

=============== =================================================== ==================================================
name            windows                                             aggregation
=============== =================================================== ==================================================
canonical       each document truncated to L, one window            token-weighted; position buckets; bootstrap CI
yarn            per document, BOS + L-1 tokens every ``stride``     **mean of per-window mean losses**
longlora_stream one stream, L tokens every ``stride``, all scored   **mean of per-batch mean losses**
sliding         per document, L tokens every ``stride``, new scored token-weighted, every token scored once
fairseq         one stream, blocks of L-C new tokens + C context    token-weighted, every token scored once
streaming       per document, (BOS +) L tokens fed one at a time    token-weighted; position buckets
                with a KV cache, optionally evicting all but the
                first and most recent entries
=============== =================================================== ==================================================

The protocols never touch a model: they call ``nll_fn(input_ids [B, T]) -> [B, T-1]``, the NLL (nats) of token
``t+1`` given tokens ``0..t`` of each row, so a hand-computable fake can stand in for a model in tests.
``model_nll_fn(model, chunk_size, device)`` is the real one (chunked logits, never ``T x V`` at once); a protocol
that must run the model differently (``streaming``: token by token with a KV cache) has its own ``model_nll_fn``
method, and ``protocol_nll_fn`` picks it.

Sources: YaRN (Peng et al., arXiv:2309.00071), LongLoRA (Chen et al., arXiv:2309.12307) and Dual Chunk Attention
(An et al., arXiv:2402.17463), ALiBi (Press et al., arXiv:2108.12409), StreamingLLM (Xiao et al., arXiv:2309.17453),
each protocol's reference file named in its docstring. Only ``canonical`` (nanoGPT's rule: NLL summed, divided once)
is a sound statistic; ``yarn`` and
``longlora_stream`` weight a prediction by one over the size of its window or batch, and exist to reproduce
published tables. Their results carry ``aggregation`` so that a report never mixes them up silently.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from lce.config import check
from lce.errors import ConfigError
from lce.eval.perplexity import NllFn, document_nll, model_nll_fn, point_score
from lce.eval.streaming import streaming_nll_fn
from lce.registry import Registry

PROTOCOLS: Registry = Registry("protocol")

TOKEN_MEAN = "token_mean"
MEAN_OF_WINDOW_MEANS = "mean_of_window_means"
MEAN_OF_BATCH_MEANS = "mean_of_batch_means"

__all__ = [
    "MEAN_OF_BATCH_MEANS", "MEAN_OF_WINDOW_MEANS", "PROTOCOLS", "TOKEN_MEAN", "CanonicalProtocol", "FairseqProtocol",
    "LongLoraStreamProtocol", "NllFn", "ProtocolScore", "SlidingProtocol", "StreamingProtocol", "YarnProtocol",
    "build_protocol", "model_nll_fn", "protocol_meta", "protocol_nll_fn",
]


@dataclass
class ProtocolScore:
    """The result of one protocol at one evaluation length.

    Attributes:
        protocol: the protocol's name.
        aggregation: how ``nll`` was formed: ``token_mean`` (summed over scored predictions, divided once),
            ``mean_of_window_means`` or ``mean_of_batch_means``.
        nll: the mean NLL (nats) the protocol reports; ``ppl = base ** nll``.
        nll_sum: total NLL over all scored predictions (float64 accumulation).
        tokens: number of scored predictions.
        windows: number of forward windows that scored at least one prediction.
        base: the base ``nll`` is raised to (``e``; LongLoRA's scripts use the literal ``2.71828``).
        bucket_size, bucket_nll, bucket_tokens: per-position buckets (summed nats), ``canonical`` only.
        ppl_low, ppl_high, confidence: bootstrap confidence interval over documents, ``canonical`` only.
    """

    protocol: str
    aggregation: str
    nll: float
    nll_sum: float
    tokens: int
    windows: int
    base: float = math.e
    bucket_size: int | None = None
    bucket_nll: list[float] | None = None
    bucket_tokens: list[int] | None = None
    ppl_low: float | None = None
    ppl_high: float | None = None
    confidence: float | None = None

    @property
    def ppl(self) -> float:
        """``base ** nll``; ``inf`` when it overflows a float."""
        return _power(self.base, self.nll)

    @property
    def token_nll(self) -> float:
        """Token-weighted mean NLL ``nll_sum / tokens``, whatever the protocol's own aggregation."""
        return self.nll_sum / self.tokens

    @property
    def bucket_mean_nll(self) -> list[float] | None:
        """Mean NLL per bucket (nats), or None without buckets."""
        if self.bucket_nll is None:
            return None
        return [s / n for s, n in zip(self.bucket_nll, self.bucket_tokens)]

    def row_fields(self) -> dict:
        """The measured fields of a result row (``lce.eval.sweep`` schema: ppl, nll, tokens, buckets as means), plus
        ``aggregation``, ``windows``, ``token_nll`` and the confidence interval."""
        return {
            "ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "aggregation": self.aggregation,
            "windows": self.windows, "token_nll": self.token_nll, "bucket_size": self.bucket_size,
            "bucket_nll": self.bucket_mean_nll, "bucket_tokens": self.bucket_tokens, "ppl_low": self.ppl_low,
            "ppl_high": self.ppl_high, "confidence": self.confidence,
        }


def _power(base: float, x: float) -> float:
    return math.inf if x * math.log(base) >= 709.0 else base**x


def build_protocol(spec: Any, where: str = "protocol"):
    """A protocol config from a name, a mapping with ``name``, a config node or an instance."""
    return PROTOCOLS.build(spec, where)


def protocol_nll_fn(protocol, model, chunk_size: int = 4096, device=None) -> NllFn:
    """The ``nll_fn`` ``protocol`` scores ``model`` with: its own ``model_nll_fn`` method if it has one (``streaming``),
    else one full forward per window (``lce.eval.perplexity.model_nll_fn``)."""
    own = getattr(protocol, "model_nll_fn", None)
    return own(model, chunk_size, device) if own is not None else model_nll_fn(model, chunk_size, device)


def protocol_meta(config) -> dict:
    """The protocol's identity for result rows: its name and every parameter."""
    return dataclasses.asdict(config)


def _check_ids(ids: Any, where: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ConfigError(f"{where}: expected a 1-D tensor of token ids, got {getattr(ids, 'dtype', '')} {shape}")
    return ids


def _as_documents(data: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """Documents: a list of 1-D token tensors (a single tensor is one document)."""
    docs = [data] if isinstance(data, torch.Tensor) else list(data)
    check(len(docs) > 0, "docs", "no documents to score")
    return [_check_ids(doc, f"docs[{i}]") for i, doc in enumerate(docs)]


def _as_stream(data: torch.Tensor | list[torch.Tensor], max_tokens: int | None) -> torch.Tensor:
    """One token stream: a 1-D tensor, or documents joined as they are (no separator, no BOS)."""
    if isinstance(data, torch.Tensor):
        stream = _check_ids(data, "stream")
    else:
        docs = _as_documents(data)
        stream = torch.cat(docs)
    return stream if max_tokens is None else stream[:max_tokens]


def _start_token(add_start_token: bool | None, bos_id: int | None, where: str) -> int | None:
    """The token put before each window (or the stream), or None: ``add_start_token`` None means iff ``bos_id``."""
    if add_start_token is False:
        return None
    if add_start_token and bos_id is None:
        raise ConfigError(f"{where}: add_start_token=true needs a bos_id (the tokenizer has none: set it to false)")
    return bos_id


def _documents_after_start(data, length: int, add_start_token: bool | None, bos_id: int | None,
                           purpose: str) -> tuple[list[torch.Tensor], torch.Tensor | None, int]:
    """The documents of ``data``, the start-token prefix (None without one) and how many document tokens a window of
    ``length`` holds after it; a document shorter than that is an error naming it (``purpose``: what they are for)."""
    _check_length(length)
    docs = _as_documents(data)
    start = _start_token(add_start_token, bos_id, "protocol.add_start_token")
    doc_tokens = length - 1 if start is not None else length
    for i, doc in enumerate(docs):
        if doc.numel() < doc_tokens:
            raise ConfigError(f"docs[{i}]: has {doc.numel()} tokens, fewer than the {doc_tokens} {purpose}")
    prefix = None if start is None else torch.tensor([start], dtype=docs[0].dtype)
    return docs, prefix, doc_tokens


def _run(
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


def _strided_windows(n: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
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


def _check_length(length: int) -> None:
    check(isinstance(length, int) and length >= 2, "length", f"must be an integer >= 2, got {length!r}")


@PROTOCOLS.register("canonical")
@dataclass(frozen=True)
class CanonicalProtocol:
    """Every document truncated to its first L tokens, one window each; NLL summed over all predictions, divided once.

    This is ``lce.eval.perplexity.score_documents`` (same numbers; nanoGPT's ``evaluate_bpb`` rule) plus
    per-position buckets (as FLA ``evals/ppl.py --bucket_size`` reports them) and a percentile bootstrap confidence
    interval over documents: documents are resampled with replacement ``n_bootstrap`` times (numpy
    ``default_rng(seed)``), each resample's token-weighted NLL computed, and the ``(1 -/+ confidence) / 2``
    quantiles reported as ``ppl_low`` / ``ppl_high``. Documents, not tokens, are the independent units: tokens of
    one document are correlated, so a per-token interval would be far too narrow. ``bos_id`` is ignored: documents
    are scored as given.

    Attributes:
        bucket_size: predicting positions per bucket; None: one bucket for the window.
        n_bootstrap: bootstrap resamples; 0 disables the interval.
        confidence: coverage of the interval.
        seed: seed of the resampling.
    """

    name: str = "canonical"
    bucket_size: int | None = None
    n_bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0

    input: ClassVar[str] = "documents"

    def __post_init__(self):
        check(self.bucket_size is None or self.bucket_size >= 1, "protocol.bucket_size",
              f"must be >= 1, got {self.bucket_size}")
        check(self.n_bootstrap >= 0, "protocol.n_bootstrap", f"must be >= 0, got {self.n_bootstrap}")
        check(0 < self.confidence < 1, "protocol.confidence", f"must be in (0, 1), got {self.confidence}")

    def score(
        self, nll_fn: NllFn, data, length: int, *, bos_id: int | None = None, batch_size: int = 1
    ) -> ProtocolScore:
        """Score ``data`` (documents of at least ``length`` tokens) at ``length``."""
        _check_length(length)
        docs = _as_documents(data)
        position_nll, doc_nll = document_nll(nll_fn, docs, length, batch_size)
        point = point_score(position_nll, len(docs), self.bucket_size or length)
        low = high = None
        if self.n_bootstrap > 0:
            low, high = bootstrap_interval(doc_nll.numpy(), length - 1, self.n_bootstrap, self.confidence, self.seed)
        return ProtocolScore(
            protocol=self.name, aggregation=TOKEN_MEAN, nll=point.nll, nll_sum=point.nll_sum, tokens=point.tokens,
            windows=len(docs), bucket_size=point.bucket_size, bucket_nll=point.bucket_nll,
            bucket_tokens=point.bucket_tokens, ppl_low=None if low is None else _power(math.e, low),
            ppl_high=None if high is None else _power(math.e, high),
            confidence=self.confidence if self.n_bootstrap > 0 else None,
        )


def bootstrap_interval(
    doc_nll: np.ndarray, tokens_per_doc: int, n_bootstrap: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of the token-weighted mean NLL, resampling documents with replacement.

    Args:
        doc_nll: ``[n_docs]`` summed NLL per document.
        tokens_per_doc: scored predictions per document (equal for all, so a resample's mean is its sum / count).

    Returns:
        ``(low, high)`` mean NLL (nats) at quantiles ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``.
    """
    rng = np.random.default_rng(seed)
    n = len(doc_nll)
    picks = rng.integers(0, n, size=(n_bootstrap, n))
    means = doc_nll[picks].sum(axis=1) / (n * tokens_per_doc)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


@PROTOCOLS.register("yarn")
@dataclass(frozen=True)
class YarnProtocol:
    """YaRN's ``eval/perplexity.py::compute_perplexity`` (jquesnelle/yarn; copied by LongRoPE
    ``evaluation/perplexity.py`` and EasyContext ``eval_ppl.py``), reproduced exactly.

    - A BOS token is put before every window (``add_start_token``; the script passes ``tokenizer.bos_token is not
      None``, which ``None`` here mirrors: a start token iff ``bos_id`` is given), so a window holds
      ``max_tokenized_len = L - 1`` document tokens and the model sees L tokens.
    - Per document, windows of ``L - 1`` tokens start every ``stride`` tokens (``--sliding-window``, 256) until one
      reaches the document's end; each scores only the tokens the previous window did not cover (the first scores
      all of its tokens, the first predicted from BOS). ``stride > L - 1`` leaves the tokens between windows
      unscored, as the script does.
    - ``truncate`` (``--truncate``): each document is cut to ``L - 1`` tokens and scored as one window.
    - **Aggregation: the mean of per-window mean losses** over all windows of all documents
      (``exp(torch.stack(nlls).mean())``), not token-weighted: a short last window weighs as much as a full one.
      The token-weighted value is kept in ``token_nll``.

    Documents must have at least ``L - 1`` tokens (``L`` without BOS); the script leaves that to
    ``--dataset-min-tokens``. A final window holding a single token and no BOS has no prediction (the script's
    loss would be NaN) and is skipped.
    """

    name: str = "yarn"
    stride: int = 256
    truncate: bool = False
    add_start_token: bool | None = None

    input: ClassVar[str] = "documents"

    def __post_init__(self):
        check(self.stride >= 1, "protocol.stride", f"must be >= 1, got {self.stride}")

    def score(
        self, nll_fn: NllFn, data, length: int, *, bos_id: int | None = None, batch_size: int = 1
    ) -> ProtocolScore:
        """Score ``data`` (documents) at evaluation length ``length`` (window length including BOS)."""
        docs, prefix, max_tokens = _documents_after_start(data, length, self.add_start_token, bos_id, "of one window")

        def windows():
            for doc in docs:
                tokens = doc[:max_tokens] if self.truncate else doc
                stride = max_tokens if self.truncate else self.stride
                for begin, end, new in _strided_windows(tokens.numel(), max_tokens, stride):
                    ids = tokens[begin:end] if prefix is None else torch.cat([prefix, tokens[begin:end]])
                    if ids.numel() >= 2:
                        yield ids, new

        means, nll_sum, count = [], 0.0, 0
        for nll, new in _run(nll_fn, windows(), batch_size):
            scored = nll[-min(new, nll.numel()):]
            means.append(scored.mean().item())
            nll_sum += scored.sum().item()
            count += scored.numel()
        return ProtocolScore(
            protocol=self.name, aggregation=MEAN_OF_WINDOW_MEANS, nll=float(np.mean(means)), nll_sum=nll_sum,
            tokens=count, windows=len(means),
        )


@PROTOCOLS.register("longlora_stream")
@dataclass(frozen=True)
class LongLoraStreamProtocol:
    """LongLoRA's ``eval.py`` (dvlab-research/LongLoRA; the same loop in HKUNLP/ChunkLlama ``ppl/test_ppl.py`` and
    LCEG ``eval_perplexity/``), reproduced exactly.

    - The documents are one stream (the reference reads a ``uint16`` ``.bin`` of concatenated LLaMA tokens): no BOS,
      no document boundaries; pass a 1-D tensor, or documents to be joined as they are.
    - Window starts ``range(0, N - L, stride)`` with the **last start dropped** (``all_ix.pop()``), so the stream
      needs at least ``L + stride + 1`` tokens; each window is ``stream[i : i + L]``.
    - The loss is HF's ``labels=input_ids`` loss: every prediction of the window (``L - 1``), overlapping windows
      scoring the same tokens again.
    - **Aggregation: the mean of per-batch mean losses** (``val_loss`` per batch of ``--batch_size`` windows, then
      ``mean`` over batches); every window has ``L - 1`` predictions, so with ``reference_batch_size=1`` (the
      README's commands) this is the mean of window means, and otherwise differs only through a partial last batch.
      ``ppl = 2.71828 ** loss`` (``euler``: the literal constant of both scripts; relative difference from ``exp``
      ~``6.7e-7 * nll``).

    Attributes:
        stride: tokens between window starts (``sliding_window=256``).
        reference_batch_size: windows averaged together before the mean over batches (the reference's
            ``--batch_size``); the forward batch size is the separate ``batch_size`` argument of ``score``.
        euler: the base the mean loss is raised to.
        max_tokens: score only the first ``max_tokens`` tokens of the stream (None: all).
    """

    name: str = "longlora_stream"
    stride: int = 256
    reference_batch_size: int = 1
    euler: float = 2.71828
    max_tokens: int | None = None

    input: ClassVar[str] = "stream"

    def __post_init__(self):
        check(self.stride >= 1, "protocol.stride", f"must be >= 1, got {self.stride}")
        check(self.reference_batch_size >= 1, "protocol.reference_batch_size",
              f"must be >= 1, got {self.reference_batch_size}")
        check(self.euler > 1, "protocol.euler", f"must be > 1, got {self.euler}")
        check(self.max_tokens is None or self.max_tokens >= 2, "protocol.max_tokens",
              f"must be >= 2, got {self.max_tokens}")

    def score(
        self, nll_fn: NllFn, data, length: int, *, bos_id: int | None = None, batch_size: int = 1
    ) -> ProtocolScore:
        """Score the stream ``data`` with windows of ``length`` tokens; ``bos_id`` is ignored (no BOS)."""
        _check_length(length)
        stream = _as_stream(data, self.max_tokens)
        starts = list(range(0, stream.numel() - length, self.stride))
        if len(starts) < 2:
            raise ConfigError(
                f"stream: {stream.numel()} tokens are too few for longlora_stream at length {length}: it needs at "
                f"least length + stride + 1 = {length + self.stride + 1} (the reference drops the last window start)"
            )
        starts.pop()
        batch_means, batch_sum, batch_count, in_batch = [], 0.0, 0, 0
        nll_sum, count = 0.0, 0
        for nll, _ in _run(nll_fn, ((stream[i : i + length], i) for i in starts), batch_size):
            total = nll.sum().item()
            nll_sum, count = nll_sum + total, count + nll.numel()
            batch_sum, batch_count, in_batch = batch_sum + total, batch_count + nll.numel(), in_batch + 1
            if in_batch == self.reference_batch_size:
                batch_means.append(batch_sum / batch_count)
                batch_sum, batch_count, in_batch = 0.0, 0, 0
        if in_batch:
            batch_means.append(batch_sum / batch_count)
        return ProtocolScore(
            protocol=self.name, aggregation=MEAN_OF_BATCH_MEANS, nll=float(np.mean(batch_means)), nll_sum=nll_sum,
            tokens=count, windows=len(starts), base=self.euler,
        )


@PROTOCOLS.register("sliding")
@dataclass(frozen=True)
class SlidingProtocol:
    """Strided sliding windows per document, as in the HF guide "Perplexity of fixed-length models"
    (transformers ``docs/source/en/perplexity.md``), with a correct token count.

    Per document, windows of L tokens start every ``stride`` tokens (None: ``L // 2``) until one reaches the end;
    each scores only the tokens the previous window did not cover, so every token after the first is scored once,
    with between ``L - stride`` and ``L - 1`` tokens of context. The first window scores its ``L - 1``
    predictions. The NLL is summed over all scored tokens of all documents and divided once by their count. (The
    guide subtracts one prediction per window for HF's internal label shift, which is right only for the first
    window: a later window's first new token is not at position 0 and is scored. Here the count is exact.)
    ``stride = L`` gives non-overlapping windows of ``L - 1`` predictions each. No BOS is added.

    Attributes:
        stride: tokens between window starts; must be <= L so that no token is skipped.
    """

    name: str = "sliding"
    stride: int | None = None

    input: ClassVar[str] = "documents"

    def __post_init__(self):
        check(self.stride is None or self.stride >= 1, "protocol.stride", f"must be >= 1, got {self.stride}")

    def score(
        self, nll_fn: NllFn, data, length: int, *, bos_id: int | None = None, batch_size: int = 1
    ) -> ProtocolScore:
        """Score ``data`` (documents of at least ``length`` tokens) with windows of ``length`` tokens."""
        _check_length(length)
        docs = _as_documents(data)
        stride = self.stride or max(1, length // 2)
        check(stride <= length, "protocol.stride",
              f"{stride} exceeds the window length {length}: tokens would be skipped")
        for i, doc in enumerate(docs):
            if doc.numel() < length:
                raise ConfigError(f"docs[{i}]: has {doc.numel()} tokens, fewer than the window length {length}")

        def windows():
            for doc in docs:
                for begin, end, new in _strided_windows(doc.numel(), length, stride):
                    if end - begin >= 2:
                        yield doc[begin:end], new

        nll_sum, count, n_windows = 0.0, 0, 0
        for nll, new in _run(nll_fn, windows(), batch_size):
            scored = nll[-min(new, nll.numel()):]
            nll_sum, count, n_windows = nll_sum + scored.sum().item(), count + scored.numel(), n_windows + 1
        return ProtocolScore(protocol=self.name, aggregation=TOKEN_MEAN, nll=nll_sum / count, nll_sum=nll_sum,
                             tokens=count, windows=n_windows)


@PROTOCOLS.register("fairseq")
@dataclass(frozen=True)
class FairseqProtocol:
    """``fairseq-eval-lm --context-window C`` on a stream (``--sample-break-mode none``), as ALiBi
    (ofirpress/attention_with_linear_biases) evaluates WikiText-103; fairseq ``fairseq_cli/eval_lm.py`` +
    ``fairseq/data/lm_context_window_dataset.py``.

    - ``--tokens-per-sample`` is the evaluation length L; eval_lm subtracts C from it, so the stream is cut into
      blocks of ``B = L - C`` target tokens, and each block is preceded by the last ``C`` tokens before it (fewer
      at the start). Every target is predicted from up to L previous tokens and scored exactly once.
    - ``context_window = 0``: non-overlapping windows of L; ``-1``: ``C = L - 1`` at every length, i.e. sliding by
      one token and scoring only the last token of each window (ALiBi's "sliding window" evaluation; one forward
      per token).
    - fairseq's block source is its target shifted right with ``</s>`` first, so the very first token of the stream
      is predicted from ``</s>``: pass ``bos_id`` (the separator fairseq uses is the tokenizer's eos) to reproduce
      that; without a start token the first token is not scored.
    - Aggregation: token-weighted (``score_sum / count``; fairseq reports base 2, the perplexity is the same).

    The model sees ``L + 1`` tokens per window, the last only as the target of the last prediction: identical to
    fairseq's ``L``-token input for any causal model whose rotation does not depend on the input length.

    Attributes:
        context_window: C, in ``[0, L)``, or -1 for ``L - 1``.
        add_start_token: None: a start token iff ``bos_id`` is given.
        max_tokens: score only the first ``max_tokens`` tokens of the stream (None: all).
    """

    name: str = "fairseq"
    context_window: int = 0
    add_start_token: bool | None = None
    max_tokens: int | None = None

    input: ClassVar[str] = "stream"

    def __post_init__(self):
        check(self.context_window >= -1, "protocol.context_window",
              f"must be >= 0, or -1 for L-1, got {self.context_window}")
        check(self.max_tokens is None or self.max_tokens >= 2, "protocol.max_tokens",
              f"must be >= 2, got {self.max_tokens}")

    def context(self, length: int) -> int:
        """C at evaluation length ``length``."""
        context = length - 1 if self.context_window == -1 else self.context_window
        check(context < length, "protocol.context_window", f"{context} must be smaller than the length {length}")
        return context

    def score(
        self, nll_fn: NllFn, data, length: int, *, bos_id: int | None = None, batch_size: int = 1
    ) -> ProtocolScore:
        """Score the stream ``data`` at ``tokens_per_sample = length``."""
        _check_length(length)
        context = self.context(length)
        block = length - context
        stream = _as_stream(data, self.max_tokens)
        start = _start_token(self.add_start_token, bos_id, "protocol.add_start_token")
        if start is not None:
            stream = torch.cat([torch.tensor([start], dtype=stream.dtype), stream])
        n_targets = stream.numel() - 1  # targets are stream[1:]
        if n_targets < length:
            raise ConfigError(f"stream: {n_targets} scorable tokens are fewer than one window of {length}")

        def windows():
            for first in range(0, n_targets, block):
                last = min(first + block, n_targets)
                # Inputs stream[lo:last] predict targets stream[lo+1:last+1]; the last (last - first) are new.
                lo = max(0, first - context)
                yield stream[lo : last + 1], last - first

        nll_sum, count, n_windows = 0.0, 0, 0
        for nll, new in _run(nll_fn, windows(), batch_size):
            scored = nll[-new:]
            nll_sum, count, n_windows = nll_sum + scored.sum().item(), count + scored.numel(), n_windows + 1
        return ProtocolScore(protocol=self.name, aggregation=TOKEN_MEAN, nll=nll_sum / count, nll_sum=nll_sum,
                             tokens=count, windows=n_windows)


@PROTOCOLS.register("streaming")
@dataclass(frozen=True)
class StreamingProtocol:
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

    def score(
        self, nll_fn: NllFn, data, length: int, *, bos_id: int | None = None, batch_size: int = 1
    ) -> ProtocolScore:
        """Score ``data`` (documents) with the first ``length - 1`` predictions of each."""
        docs, prefix, doc_tokens = _documents_after_start(data, length, self.add_start_token, bos_id, "streamed")
        if prefix is not None:
            docs = [torch.cat([prefix, doc[:doc_tokens]]) for doc in docs]
        position_nll, _ = document_nll(nll_fn, docs, length, batch_size)
        point = point_score(position_nll, len(docs), self.bucket_size or length)
        return ProtocolScore(
            protocol=self.name, aggregation=TOKEN_MEAN, nll=point.nll, nll_sum=point.nll_sum, tokens=point.tokens,
            windows=len(docs), bucket_size=point.bucket_size, bucket_nll=point.bucket_nll,
            bucket_tokens=point.bucket_tokens,
        )
