"""The ``eval`` config group: which documents are scored at which lengths, and how.

Two of its fields are config groups of their own, nested under ``conf/eval/``: ``protocol`` (``eval/protocol=yarn``,
one option per registered protocol, ``lce.eval.protocols``) and ``retrieval`` (``eval/retrieval=[passkey,needle]``,
several options at once, each under its own key: a mapping task name -> fields, ``lce.eval.retrieval``). A third,
``harness`` (``eval/harness=longbench``, ``lce.eval.harness``), selects lm-evaluation-harness tasks.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lce.config import check, check_at_least, non_default_fields, to_plain, unknown_key
from lce.errors import ConfigError
from lce.eval.harness import build_harness
from lce.eval.protocols import PROTOCOLS, Protocol, build_protocol
from lce.eval.retrieval import RETRIEVALS, build_retrieval
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


def _defaults(cls) -> dict[str, Any]:
    """The init fields of dataclass ``cls`` with their defaults (what its option file lists)."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls) if f.init}


def _without_merged_option(spec: dict, where: str) -> dict:
    """``spec`` without the fields of the option file it was merged over, when it is in the form before
    ``eval.protocol`` was a config group.

    An experiment file's ``eval: {protocol: {name: yarn, truncate: true}}`` is merged by Hydra into the option the
    defaults list selected (``canonical``), so it arrives with that option's fields beside its own. They are dropped,
    with a DeprecationWarning, when they are exactly the fields of one registered protocol that the named one lacks,
    at their defaults; anything else stays, to be reported as an unknown key.
    """
    own = _defaults(PROTOCOLS.get(spec["name"], f"{where}.name"))
    foreign = {key: value for key, value in spec.items() if key not in own}
    if not foreign:
        return spec
    for name in PROTOCOLS:
        defaults = _defaults(PROTOCOLS.get(name))
        if foreign == {key: value for key, value in defaults.items() if key not in own}:
            warnings.warn(f"{where}: a mapping naming {spec['name']!r} over the fields of {name!r} is deprecated; "
                          f"select the protocol with eval/protocol={spec['name']} (an experiment's defaults list: "
                          f"override /eval/protocol: {spec['name']})", DeprecationWarning, stacklevel=4)
            return {key: value for key, value in spec.items() if key in own}
    return spec


def eval_protocol(spec: Any, where: str = "eval.protocol") -> Protocol:
    """The protocol ``eval.protocol`` selects: ``canonical`` for None, else a name, a mapping with ``name`` (the
    composed option, or the form before the config group) or a protocol config."""
    spec = to_plain(spec)
    if spec is None:
        return build_protocol("canonical", where)
    if isinstance(spec, Mapping) and spec.get("name") in PROTOCOLS:
        spec = _without_merged_option(dict(spec), where)
    return build_protocol(spec, where)


def _retrieval_task(key: str, spec: Any, where: str):
    """Task ``key`` of the ``eval.retrieval`` mapping from its fields (its option file's, which carry ``name``) or its
    config."""
    if key not in RETRIEVALS:
        raise unknown_key(where, RETRIEVALS.names())
    spec = to_plain(spec)
    # Fields without a name were set (by an experiment file, say) for a task whose option is not selected: running it
    # anyway would add a task nobody chose, so say how to choose it or drop them.
    check(not isinstance(spec, Mapping) or "name" in spec, where,
          f"fields are set but the task is not selected; select it (eval/retrieval=[...,{key}]) or drop them "
          f"(~{where})")
    task = build_retrieval(spec, where)
    check(task.name == key, f"{where}.name", f"must be {key!r}, the task's key, got {task.name!r}")
    return task


def eval_retrieval(spec: Any, where: str = "eval.retrieval") -> dict[str, Any]:
    """The retrieval tasks ``eval.retrieval`` selects, by name in run order: from a mapping task name -> fields (the
    composed ``eval/retrieval`` options), None (no tasks) or, deprecated, a list of tasks (names, mappings with
    ``name`` or configs), the form before the config group."""
    spec = to_plain(spec)
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return {key: _retrieval_task(key, value, f"{where}.{key}") for key, value in spec.items()}
    if not isinstance(spec, (list, tuple)):
        raise ConfigError(f"{where}: expected a mapping of task name -> fields, got {spec!r}")
    if spec:
        warnings.warn(f"{where}: a list of tasks is deprecated; select them with eval/retrieval=[passkey,needle] "
                      f"and set fields as eval.retrieval.passkey.trials=2", DeprecationWarning, stacklevel=3)
    tasks: dict[str, Any] = {}
    for i, item in enumerate(spec):
        task = build_retrieval(item, f"{where}[{i}]")
        check(task.name not in tasks, f"{where}[{i}]", f"a second {task.name} task; each task runs once")
        tasks[task.name] = task
    return tasks


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity-vs-length sweep: each test document truncated to each length, NLL summed and divided once.

    ``posencs`` lists training-free position encodings to evaluate the same model with, one series each (e.g.
    ``[{name: pi, factor: 32}, {name: yarn, factor: 32}]``); each entry may carry a ``label`` for the plot and table
    (default: the name and its non-default parameters). Empty: the model is evaluated as the run patched it. Each must
    give the model the kind of position signal it was trained with (``PosEnc.signal``: RoPE methods for a RoPE
    model), unless ``allow_other_signals`` (an ablation such as NoPE on a RoPE-trained model).
    ``protocol`` is the perplexity protocol (``lce.eval.protocols``: canonical, yarn, longlora_stream, sliding,
    fairseq, streaming), given as the ``eval/protocol`` option, a name, a mapping with ``name`` or a config (None:
    canonical) and held as its typed config; the buckets of ``canonical`` and ``streaming`` default to the training
    length. ``retrieval`` holds the retrieval tasks (``lce.eval.retrieval``: passkey, needle, ruler_*) run after the
    perplexity sweep, by name in run order, given as a mapping task name -> fields (``eval/retrieval`` options), None
    (none) or, deprecated, a list. ``harness`` holds lm-evaluation-harness tasks run after them (``lce.eval.harness``:
    the ``eval/harness`` option's fields, a ``HarnessConfig`` or None). ``min_doc_tokens``: the documents' minimum
    length (None: the longest evaluation length); YaRN's runs of its 8k-context models read the same documents of
    >= 131072 tokens as its 64k/128k runs, at shorter lengths.
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
    protocol: Any = None
    retrieval: Any = None
    harness: Any = None

    def protocol_config(self) -> Protocol:
        """The protocol config: ``protocol`` itself, kept for callers from before it was typed."""
        return self.protocol

    def __post_init__(self):
        # Frozen: the typed configs replace the forms they were given in, once, so every reader sees the same objects.
        object.__setattr__(self, "protocol", eval_protocol(self.protocol))
        object.__setattr__(self, "retrieval", eval_retrieval(self.retrieval))
        object.__setattr__(self, "harness", build_harness(self.harness))
        check(len(self.lengths) > 0, "eval.lengths", "must list at least one length")
        for length in self.lengths:
            check(length >= 2, "eval.lengths", f"every length must be >= 2 (one prediction), got {length}")
        check(len(set(self.lengths)) == len(self.lengths), "eval.lengths", f"has duplicates: {self.lengths}")
        check_at_least(self, "eval", 1, "n_docs", "batch_size", "loss_chunk_size")
        check(self.min_doc_tokens is None or self.min_doc_tokens >= max(self.lengths), "eval.min_doc_tokens",
              f"must be at least the longest length {max(self.lengths)} (each document is truncated to each length), "
              f"got {self.min_doc_tokens}")
        labels = [posenc_label(spec, f"eval.posencs[{i}]")[1] for i, spec in enumerate(self.posencs)]
        check(len(set(labels)) == len(labels), "eval.posencs", f"labels must be distinct, got {labels}")
        check(self.bucket_size is None or self.bucket_size >= 1, "eval.bucket_size",
              f"must be >= 1, got {self.bucket_size}")
