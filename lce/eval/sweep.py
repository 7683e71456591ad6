"""A resumable perplexity-vs-length sweep whose results live in an append-only JSONL file.

Each evaluated length is one row, appended and fsynced as soon as it is scored, so a killed sweep loses at most the
point in flight and a rerun with the same identity (``point_key``) skips what is already there. Points share no
state: each one scores the documents from scratch, so a point's result does not depend on which lengths ran before
it. Running out of memory at a length is a result (``status: "oom"``), not a crash; the sweep moves on.

Under a multi-process launcher (``accelerate launch``, ``torchrun``) each point's forward passes are shared out among
the processes (``lce.eval.shard``) and the points written equal a one-process run's exactly; only the main process
reads and writes the store, and every process returns the same rows.

Row schema (``meta`` fields first, then):
    length, status ("ok" | "oom"), ppl, nll (mean nats per token), tokens (scored predictions),
    tokens_per_s (tokens / seconds), peak_mem_mb, mem_kind (see ``lce.eval.memory``), seconds (scoring wall time),
    bucket_size, bucket_nll (mean NLL per position bucket), bucket_tokens, time (UTC ISO 8601),
    and for OOM rows ``error`` (first line of the message) with ppl, nll, tokens and buckets null.
"""

from __future__ import annotations

import fcntl
import gc
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lce.config import check
from lce.errors import ConfigError, LceError
from lce.eval.memory import measure_peak_memory
from lce.eval.perplexity import NllFn
from lce.eval.protocols import CanonicalProtocol, protocol_nll_fn
from lce.eval.shard import Shard, current_shard, score_sharded

KEY_FIELDS = ("run", "method", "params", "model", "length", "seed", "protocol")
META_FIELDS = tuple(k for k in KEY_FIELDS if k != "length")
SCORE_FIELDS = (
    "ppl", "nll", "tokens", "aggregation", "windows", "token_nll", "bucket_size", "bucket_nll", "bucket_tokens",
    "ppl_low", "ppl_high", "confidence",
)
MEASURED_FIELDS = ("length", "status", *SCORE_FIELDS, "tokens_per_s", "peak_mem_mb", "mem_kind", "seconds", "time",
                   "error")
DONE_STATUSES = ("ok", "oom")
OOM_MESSAGES = ("out of memory", "can't allocate memory", "DefaultCPUAllocator")


def _dumps(value: Any, **kwargs) -> str:
    # default=str keeps Paths and numpy scalars writable, and point_key uses the same rule so keys survive the trip.
    return json.dumps(value, default=str, **kwargs)


class ResultStore:
    """Rows of a sweep, one JSON object per line, safe against a kill at any moment and shared by processes.

    Parallel jobs of one experiment (``hydra/launcher=local`` or ``slurm``) append to the same file: writers hold an
    exclusive ``flock`` on ``<file>.lock`` and readers a shared one, so no reader sees half a line and no writer's
    tail repair cuts another's row (``flock`` is advisory and works across processes of one machine and on Linux NFS
    mounts, where it is mapped to POSIX locks).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, row: dict) -> None:
        """Write ``row`` as one line and fsync it before returning."""
        line = _dumps(row) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(exclusive=True):
            self._repair_tail()
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())

    def rows(self) -> list[dict]:
        """All rows; a corrupt last line (a kill mid-write) is skipped with a warning, any other is an error."""
        if not self.path.exists():
            return []
        with self._locked(exclusive=False):
            data = self.path.read_bytes()
        lines = data.split(b"\n")
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        rows = []
        for i, line in enumerate(lines[: last + 1]):
            if not line.strip():
                continue
            row = _parse(line)
            if row is not None:
                rows.append(row)
            elif i == last:
                warnings.warn(
                    f"{self.path}:{i + 1}: ignoring a truncated or corrupt last line (a sweep killed mid-write?); "
                    "that point will be recomputed",
                    stacklevel=2,
                )
            else:
                raise LceError(f"{self.path}:{i + 1}: not a JSON object; fix or delete this line to resume")
        return rows

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        try:
            lock = open(self.path.with_name(self.path.name + ".lock"), "a")  # noqa: SIM115 - closed below
        except OSError:
            if exclusive:
                raise
            yield  # a read-only directory (committed results): nobody can be writing there
            return
        with lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _repair_tail(self) -> None:
        """Drop a corrupt last line and end the file with a newline, so the next row starts on a line of its own."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        body = data.rstrip(b"\n")
        start = body.rfind(b"\n") + 1
        if _parse(body[start:]) is None:
            with open(self.path, "r+b") as f:
                f.truncate(start)
        elif not data.endswith(b"\n"):
            with open(self.path, "ab") as f:
                f.write(b"\n")


def _parse(line: bytes) -> dict | None:
    """The JSON object on ``line``, or None if it is not one."""
    try:
        row = json.loads(line)
    except ValueError:  # also covers a UTF-8 sequence cut in half
        return None
    return row if isinstance(row, dict) else None


def point_key(row: dict) -> str:
    """Identity of a point: canonical JSON (sorted keys, nested too) of the ``KEY_FIELDS`` of ``row``.

    Raises:
        ConfigError: if ``row`` lacks one of the key fields.
    """
    missing = [k for k in KEY_FIELDS if k not in row]
    if missing:
        raise ConfigError(f"result row lacks identity field(s) {', '.join(missing)}; required: {', '.join(KEY_FIELDS)}")
    return _dumps({k: row[k] for k in KEY_FIELDS}, sort_keys=True, separators=(",", ":"))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CUDA or CPU) rather than a bug."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in OOM_MESSAGES)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure_point(nll_fn: NllFn, data, length: int, *, protocol, bos_id: int | None, batch_size: int,
                   device: torch.device, shard: Shard) -> dict:
    """The measured fields of one length: the protocol's score, wall time and peak memory (of this process), or an
    OOM record."""
    error = None
    start = time.perf_counter()
    with measure_peak_memory(device) as mem:
        try:
            score = score_sharded(
                lambda fn: protocol.score(fn, data, length, bos_id=bos_id, batch_size=batch_size), nll_fn, shard,
                is_out_of_memory,
            )
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            error = (str(e).strip().splitlines() or [type(e).__name__])[0]
    seconds = time.perf_counter() - start
    common = {"length": length, "peak_mem_mb": mem.peak_mb, "mem_kind": mem.kind, "seconds": seconds}
    stamp = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if error is not None:
        # The exception (and the tensors its traceback pinned) is gone once the except block ends; free it now.
        _free_memory(device)
        return {**common, "status": "oom", **dict.fromkeys(SCORE_FIELDS), "tokens_per_s": None, **stamp,
                "error": error}
    return {
        **common, "status": "ok", **score.row_fields(),
        "tokens_per_s": score.tokens / seconds if seconds > 0 else math.inf, **stamp,
    }


def _check_meta(meta: dict) -> None:
    missing = [k for k in META_FIELDS if k not in meta]
    check(not missing, "meta", f"missing identity field(s) {', '.join(missing)}; required: {', '.join(META_FIELDS)}")
    clash = [k for k in MEASURED_FIELDS if k in meta]
    check(not clash, "meta", f"field(s) {', '.join(clash)} are written by the sweep itself; rename them")


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
        Every row in the store with this ``meta``'s identity (earlier runs' and new), sorted by length; the same on
        every process.

    Raises:
        ConfigError: bad ``meta`` or lengths, or a document shorter than the longest length (before scoring anything).
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

    shard = shard if shard is not None else current_shard()

    done: dict[str, dict] = {}
    # Only the main process reads the store, so that every process skips the same points (the collectives of a
    # point must be entered by all of them) even if the file is not shared or changes meanwhile.
    for row in shard.broadcast(store.rows() if shard.is_main else None):
        if row.get("status") in DONE_STATUSES:
            done.setdefault(point_key(row), row)

    nll_fn = protocol_nll_fn(protocol, model, chunk_size, device)
    bar = tqdm(lengths, desc="ppl vs length", unit="len", disable=not (progress and shard.is_main))
    for length in bar:
        key = point_key({**meta, "length": length})
        bar.set_postfix_str(f"length={length}")
        if key not in done:
            row = {**meta, **_measure_point(nll_fn, docs, length, protocol=protocol, bos_id=bos_id,
                                            batch_size=batch_size, device=device, shard=shard)}
            if shard.is_main:
                store.append(row)
            done[key] = shard.broadcast(row)
        ppl = done[key]["ppl"]
        bar.set_postfix_str(f"length={length} ppl={ppl:.4g}" if ppl is not None else f"length={length} OOM")

    identity = point_key({**meta, "length": None})
    mine = [row for row in done.values() if point_key({**row, "length": None}) == identity]
    return sorted(mine, key=lambda row: row["length"])
