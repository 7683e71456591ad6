"""The ``eval`` config group: which documents are scored at which lengths, and how."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lce.config import check, check_at_least, non_default_fields
from lce.eval.protocols import build_protocol
from lce.eval.retrieval import build_retrieval
from lce.posenc import POSENCS


def posenc_label(spec: dict, where: str = "posenc") -> tuple[object, str]:
    """A validated position-encoding config and its series label (``label`` key, else name + changed fields)."""
    spec = dict(spec)
    label = spec.pop("label", None)
    config = POSENCS.build(spec, where)
    if label is None:
        changed = non_default_fields(config)
        label = " ".join([config.name, *(f"{k}={v}" for k, v in changed.items())])
    return config, str(label)


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity-vs-length sweep: each test document truncated to each length, NLL summed and divided once.

    ``posencs`` lists training-free position encodings to evaluate the same model with, one series each (e.g.
    ``[{name: pi, factor: 32}, {name: yarn, factor: 32}]``); each entry may carry a ``label`` for the plot and table
    (default: the name and its non-default parameters). Empty: the model is evaluated as the run patched it. Each must
    give the model the kind of position signal it was trained with (``PosEnc.signal``: RoPE methods for a RoPE
    model), unless ``allow_other_signals`` (an ablation such as NoPE on a RoPE-trained model).
    ``protocol`` selects the perplexity protocol (``lce.eval.protocols``: canonical, yarn, longlora_stream, sliding,
    fairseq, streaming) with its parameters (None: canonical; a mapping, so a Hydra override replaces it whole);
    the buckets of ``canonical`` and ``streaming`` default to the training length. ``retrieval`` lists
    retrieval tasks (``lce.eval.retrieval``: passkey, needle) run after the perplexity sweep. ``min_doc_tokens``: the
    documents' minimum length (None: the longest evaluation length); YaRN's runs of its 8k-context models read the
    same documents of >= 131072 tokens as its 64k/128k runs, at shorter lengths.
    """

    name: str = "default"
    lengths: list[int] = field(default_factory=lambda: [128, 256, 512, 1024, 2048])
    n_docs: int = 16
    split: Literal["validation", "test"] = "test"
    documents: Literal["long", "concat", "first"] = "long"
    min_doc_tokens: int | None = None
    batch_size: int = 4
    bucket_size: int | None = None
    loss_chunk_size: int = 4096
    posencs: list[dict] = field(default_factory=list)
    allow_other_signals: bool = False
    protocol: dict | None = None
    retrieval: list[dict] = field(default_factory=list)

    def protocol_config(self):
        """The validated protocol config (``canonical`` when none is set)."""
        return build_protocol(self.protocol or "canonical", "eval.protocol")

    def __post_init__(self):
        check(len(self.lengths) > 0, "eval.lengths", "must list at least one length")
        for length in self.lengths:
            check(length >= 2, "eval.lengths", f"every length must be >= 2 (one prediction), got {length}")
        check(len(set(self.lengths)) == len(self.lengths), "eval.lengths", f"has duplicates: {self.lengths}")
        check_at_least(self, "eval", 1, "n_docs", "batch_size", "loss_chunk_size")
        check(self.min_doc_tokens is None or self.min_doc_tokens >= max(self.lengths), "eval.min_doc_tokens",
              f"must be at least the longest length {max(self.lengths)} (each document is truncated to each length), "
              f"got {self.min_doc_tokens}")
        self.protocol_config()
        for i, spec in enumerate(self.retrieval):
            build_retrieval(spec, f"eval.retrieval[{i}]")
        labels = [posenc_label(spec, f"eval.posencs[{i}]")[1] for i, spec in enumerate(self.posencs)]
        check(len(set(labels)) == len(labels), "eval.posencs", f"labels must be distinct, got {labels}")
        check(self.bucket_size is None or self.bucket_size >= 1, "eval.bucket_size",
              f"must be >= 1, got {self.bucket_size}")
