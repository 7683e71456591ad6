"""``fairseq``: ``fairseq-eval-lm --context-window C`` on one stream, as ALiBi (arXiv:2108.12409) evaluates
WikiText-103; every token scored once, token-weighted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lce.config import check
from lce.errors import ConfigError
from lce.eval.perplexity import NllFn
from lce.eval.protocols.registry import PROTOCOLS, Protocol
from lce.eval.protocols.windows import as_stream, check_length, run_windows, score_new_tokens, start_token
from lce.eval.score import ProtocolScore


@PROTOCOLS.register("fairseq")
@dataclass(frozen=True)
class FairseqProtocol(Protocol):
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
        check_length(length)
        context = self.context(length)
        block = length - context
        stream = as_stream(data, self.max_tokens)
        start = start_token(self.add_start_token, bos_id, "protocol.add_start_token")
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

        return score_new_tokens(self.name, run_windows(nll_fn, windows(), batch_size))
