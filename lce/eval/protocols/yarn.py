"""``yarn``: YaRN's ``compute_perplexity`` (jquesnelle/yarn, arXiv:2309.00071), the mean of per-window mean
losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from lce.config import check
from lce.eval.perplexity import NllFn
from lce.eval.protocols.registry import PROTOCOLS, Protocol
from lce.eval.protocols.windows import documents_after_start, run_windows, strided_windows
from lce.eval.score import MEAN_OF_WINDOW_MEANS, ProtocolScore


@PROTOCOLS.register("yarn")
@dataclass(frozen=True)
class YarnProtocol(Protocol):
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
        docs, prefix, max_tokens = documents_after_start(data, length, self.add_start_token, bos_id, "of one window")

        def windows():
            for doc in docs:
                tokens = doc[:max_tokens] if self.truncate else doc
                stride = max_tokens if self.truncate else self.stride
                for begin, end, new in strided_windows(tokens.numel(), max_tokens, stride):
                    ids = tokens[begin:end] if prefix is None else torch.cat([prefix, tokens[begin:end]])
                    if ids.numel() >= 2:
                        yield ids, new

        means, nll_sum, count = [], 0.0, 0
        for nll, new in run_windows(nll_fn, windows(), batch_size):
            scored = nll[-min(new, nll.numel()):]
            means.append(scored.mean().item())
            nll_sum += scored.sum().item()
            count += scored.numel()
        return ProtocolScore(
            protocol=self.name, aggregation=MEAN_OF_WINDOW_MEANS, nll=float(np.mean(means)), nll_sum=nll_sum,
            tokens=count, windows=len(means),
        )
