"""A resumable perplexity-vs-length sweep whose results live in an append-only JSONL file.

Each evaluated length is one row, measured and recorded by the resumable point runner (``lce.eval.runner``), so a
killed sweep loses at most the point in flight and a rerun with the same identity (``point_key``) skips what is
already there. Points share no
state: each one scores the documents from scratch, so a point's result does not depend on which lengths ran before
it. Running out of memory at a length is a result (``status: "oom"``), not a crash; the sweep moves on. So is a NaN
or infinite loss (``status: "nonfinite"``, e.g. a broken ``rope_theta``): JSON has no NaN, and a rerun would only
compute it again.

Two runs of one sweep into one file at once (a relaunched job, a SLURM requeue) may both compute a point, but only
the first to append it writes it and both return that row; of a point a file already holds twice, every reader takes
the first finished row (``lce.eval.store``).

Under a multi-process launcher (``accelerate launch``, ``torchrun``) each point's forward passes are shared out among
the processes (``lce.eval.shard``) and the points written equal a one-process run's exactly; only the main process
reads and writes the store, and every process returns the same rows.

Row schema (``meta`` fields first, then):
    length, status ("ok" | "oom" | "nonfinite"), ppl, nll (mean nats per token), tokens (scored predictions),
    tokens_per_s (tokens / seconds), peak_mem_mb, mem_kind (see ``lce.eval.memory``), seconds (scoring wall time),
    bucket_size, bucket_nll (mean NLL per position bucket), bucket_tokens, time (UTC ISO 8601),
    ppl_low / ppl_high (null when the protocol has no interval, or a bound overflows a float),
    for OOM rows ``error`` (first line of the message) with ppl, nll, tokens and buckets null, and
    for nonfinite rows ``error`` (the non-finite nll / ppl found) with every NaN or infinite score field (ppl, nll,
    token_nll, bucket_nll entries, ppl_low, ppl_high) null; a finite nll whose ppl overflows is kept.
    Rows of an older lce with status "ok" and a NaN or infinite ppl or nll are read as "nonfinite".
"""


from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lce.config import check
from lce.eval.perplexity import NllFn
from lce.eval.protocols import CanonicalProtocol, protocol_nll_fn
from lce.eval.runner import OOM_MESSAGES, PointRunner, is_out_of_memory, measure, utc_now
from lce.eval.shard import Shard, current_shard, score_sharded
from lce.eval.store import (
    DONE_STATUSES,
    KEY_FIELDS,
    META_FIELDS,
    NONFINITE,
    OK,
    OOM,
    SCORE_FIELDS,
    KeyFn,
    ResultStore,
    first_finished,
    has_nonfinite,
    mark_nonfinite,
    point_key,
)

__all__ = [  # the store's and the runner's names stay importable from here, where they lived before
    "DONE_STATUSES", "KEY_FIELDS", "MEASURED_FIELDS", "META_FIELDS", "NONFINITE", "OK", "OOM", "OOM_MESSAGES",
    "SCORE_FIELDS", "KeyFn", "ResultStore", "first_finished", "is_out_of_memory", "mark_nonfinite", "point_key",
    "run_sweep",
]

MEASURED_FIELDS = ("length", "status", *SCORE_FIELDS, "tokens_per_s", "peak_mem_mb", "mem_kind", "seconds", "time",
                   "error")


def _measure_point(nll_fn: NllFn, data, length: int, *, protocol, bos_id: int | None, batch_size: int,
                   device: torch.device, shard: Shard) -> dict:
    """The measured fields of one length: the protocol's score, wall time and peak memory (of this process), or an
    OOM record."""
    run = measure(lambda: score_sharded(
        lambda fn: protocol.score(fn, data, length, bos_id=bos_id, batch_size=batch_size), nll_fn, shard,
        is_out_of_memory,
    ), device)
    common = {"length": length, "peak_mem_mb": run.peak_mem_mb, "mem_kind": run.mem_kind, "seconds": run.seconds}
    if run.error is not None:
        return {**common, "status": OOM, **dict.fromkeys(SCORE_FIELDS), "tokens_per_s": None, "time": utc_now(),
                "error": run.error}
    score = run.value
    fields = score.row_fields()
    for bound in ("ppl_low", "ppl_high"):
        # exp() of a finite bound beyond a float's range: the interval is unbounded there, which null says.
        if fields[bound] == math.inf:
            fields[bound] = None
    tokens_per_s = score.tokens / run.seconds if run.seconds > 0 else None
    return {**common, "status": OK, **fields, "tokens_per_s": tokens_per_s, "time": utc_now()}


def _check_meta(meta: dict) -> None:
    missing = [k for k in META_FIELDS if k not in meta]
    check(not missing, "meta", f"missing identity field(s) {', '.join(missing)}; required: {', '.join(META_FIELDS)}")
    clash = [k for k in MEASURED_FIELDS if k in meta]
    check(not clash, "meta", f"field(s) {', '.join(clash)} are written by the sweep itself; rename them")
    nonfinite = [k for k, v in meta.items() if has_nonfinite(v)]
    check(not nonfinite, "meta", f"field(s) {', '.join(nonfinite)} hold NaN or infinity, which JSON cannot represent")


def run_sweep(
    model: nn.Module,
    docs: list[torch.Tensor] | torch.Tensor,
    lengths: Iterable[int],
    store: ResultStore | str | Path,
    *,
    meta: dict,
    protocol=None,
    bos_id: int | None = None,
    batch_size: int = 1,
    chunk_size: int = 4096,
    bucket_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    shard: Shard | None = None,
) -> list[dict]:
    """Score ``docs`` at each of ``lengths``, appending one row per new point to ``store``.

    Args:
        model: a causal LM supported by ``lce.hf.adapters``.
        docs: 1-D int64 token tensors (each at least ``max(lengths)`` tokens long for document protocols), or one
            stream for stream protocols.
        lengths: evaluation lengths, scored in the given order.
        store: the JSONL result file (or its path).
        meta: fields written into every row; must hold the identity fields run, method, params, model, seed and
            protocol (a dict describing the evaluation: n_docs, split, doc policy, bucket_size, ...), and may hold
            more (train_length, git revision, ...) that is recorded but not part of the identity.
        protocol: a ``lce.eval.protocols`` config; None: ``canonical`` with ``bucket_size`` and no bootstrap.
        bos_id: the start token for protocols that prepend one (``yarn``, ``fairseq``).
        batch_size: windows per forward pass.
        chunk_size: rows of logits materialised at once.
        bucket_size: predicting positions per NLL bucket; ``None`` is one bucket per window.
        device: where to run; ``None`` means the device of the model's parameters.
        progress: show a progress bar (on the main process).
        shard: this process's share of the work; None: ``lce.eval.shard.current_shard()`` (several processes under
            ``accelerate launch`` or ``torchrun``, else one). Every process of the shard must call ``run_sweep``
            with the same arguments; only the main one writes ``store``.

    Returns:
        Every finished row in the store with this ``meta``'s identity (earlier runs' and new; of a point written
        twice, the first), sorted by length; the same on every process and in every run that wrote concurrently.

    Raises:
        ConfigError: bad ``meta`` or lengths, or a document shorter than the longest length (before scoring anything).
        LceError: ``store`` cannot be written (``ResultStore.check_writable``, before scoring anything).
    """
    _check_meta(meta)
    lengths = list(lengths)
    check(len(lengths) > 0, "lengths", "no lengths to evaluate")
    check(len(docs) > 0, "docs", "no documents to score")
    for length in lengths:
        check(isinstance(length, int) and length >= 2, "lengths", f"each must be an integer >= 2, got {length!r}")
    protocol = protocol if protocol is not None else CanonicalProtocol(bucket_size=bucket_size, n_bootstrap=0)
    if protocol.input == "documents":
        shortest = min(range(len(docs)), key=lambda i: docs[i].numel())
        too_long = [length for length in lengths if length > docs[shortest].numel()]
        check(
            not too_long, "lengths",
            f"{too_long} exceed docs[{shortest}], the shortest document ({docs[shortest].numel()} tokens)",
        )
    store = store if isinstance(store, ResultStore) else ResultStore(store)
    device = torch.device(device) if device is not None else next(model.parameters()).device

    runner = PointRunner(store, point_key, shard if shard is not None else current_shard())
    nll_fn = protocol_nll_fn(protocol, model, chunk_size, device)
    bar = tqdm(lengths, desc="ppl vs length", unit="len", disable=not (progress and runner.shard.is_main))
    for length in bar:
        identity = {**meta, "length": length}
        bar.set_postfix_str(f"length={length}")
        row = runner.finished(identity)
        if row is None:
            row = runner.record(identity, _measure_point(nll_fn, docs, length, protocol=protocol, bos_id=bos_id,
                                                         batch_size=batch_size, device=device, shard=runner.shard))
        ppl, status = row["ppl"], row["status"]
        bar.set_postfix_str(f"length={length} ppl={ppl:.4g}" if status == OK else f"length={length} {status}")
    return runner.series_rows(meta, order=lambda row: row["length"])
