"""``sliding``: strided sliding windows per document (the HF guide "Perplexity of fixed-length models"), every
token scored once, token-weighted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lce.config import check
from lce.errors import ConfigError
from lce.eval.perplexity import NllFn
from lce.eval.protocols.registry import PROTOCOLS, Protocol
from lce.eval.protocols.windows import as_documents, check_length, run_windows, score_new_tokens, strided_windows
from lce.eval.score import ProtocolScore


@PROTOCOLS.register("sliding")
@dataclass(frozen=True)
class SlidingProtocol(Protocol):
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
        check_length(length)
        docs = as_documents(data)
        stride = self.stride or max(1, length // 2)
        check(stride <= length, "protocol.stride",
              f"{stride} exceeds the window length {length}: tokens would be skipped")
        for i, doc in enumerate(docs):
            if doc.numel() < length:
                raise ConfigError(f"docs[{i}]: has {doc.numel()} tokens, fewer than the window length {length}")

        def windows():
            for doc in docs:
                for begin, end, new in strided_windows(doc.numel(), length, stride):
                    if end - begin >= 2:
                        yield doc[begin:end], new

        return score_new_tokens(self.name, run_windows(nll_fn, windows(), batch_size))
