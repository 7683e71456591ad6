"""``longlora_stream``: LongLoRA's ``eval.py`` (arXiv:2309.12307) on one token stream, the mean of per-batch mean
losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lce.config import check
from lce.errors import ConfigError
from lce.eval.perplexity import NllFn
from lce.eval.protocols.registry import PROTOCOLS, Protocol
from lce.eval.protocols.windows import as_stream, check_length, run_windows
from lce.eval.score import MEAN_OF_BATCH_MEANS, ProtocolScore


@PROTOCOLS.register("longlora_stream")
@dataclass(frozen=True)
class LongLoraStreamProtocol(Protocol):
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
        check_length(length)
        stream = as_stream(data, self.max_tokens)
        starts = list(range(0, stream.numel() - length, self.stride))
        if len(starts) < 2:
            raise ConfigError(
                f"stream: {stream.numel()} tokens are too few for longlora_stream at length {length}: it needs at "
                f"least length + stride + 1 = {length + self.stride + 1} (the reference drops the last window start)"
            )
        starts.pop()
        batch_means, batch_sum, batch_count, in_batch = [], 0.0, 0, 0
        nll_sum, count = 0.0, 0
        for nll, _ in run_windows(nll_fn, ((stream[i : i + length], i) for i in starts), batch_size):
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
