"""A resumable perplexity-vs-length sweep whose results live in an append-only JSONL file.

Each evaluated length is one row, appended and fsynced as soon as it is scored, so a killed sweep loses at most the
point in flight and a rerun with the same identity (``point_key``) skips what is already there. Points share no
state: each one scores the documents from scratch, so a point's result does not depend on which lengths ran before
it. Running out of memory at a length is a result (``status: "oom"``), not a crash; the sweep moves on. So is a NaN
or infinite loss (``status: "nonfinite"``, e.g. a broken ``rope_theta``): JSON has no NaN, and a rerun would only
compute it again.

Two runs of one sweep into one file at once (a relaunched job, a SLURM requeue) may both compute a point, but only
the first to append it writes it (``ResultStore.append_unless_done`` checks again under the writers' lock) and both
return that row. A file written by an older lce may still hold a point twice; every reader (this sweep,
``lce.eval.report``, ``lce report``) then takes the first finished row of each identity (``first_finished``).

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

import copy
import fcntl
import gc
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
from lce.paths import unwritable_reason

KEY_FIELDS = ("run", "method", "params", "model", "length", "seed", "protocol")
META_FIELDS = tuple(k for k in KEY_FIELDS if k != "length")
SCORE_FIELDS = (
    "ppl", "nll", "tokens", "aggregation", "windows", "token_nll", "bucket_size", "bucket_nll", "bucket_tokens",
    "ppl_low", "ppl_high", "confidence",
)
MEASURED_FIELDS = ("length", "status", *SCORE_FIELDS, "tokens_per_s", "peak_mem_mb", "mem_kind", "seconds", "time",
                   "error")
OK, OOM, NONFINITE = "ok", "oom", "nonfinite"
DONE_STATUSES = (OK, OOM, NONFINITE)
OOM_MESSAGES = ("out of memory", "can't allocate memory", "DefaultCPUAllocator")

KeyFn = Callable[[dict], "str | None"]
"""The identity of a row (``point_key``, ``lce.eval.retrieval.retrieval_key``), or None for a row of another kind."""


def _dumps(value: Any, **kwargs) -> str:
    # default=str keeps Paths and numpy scalars writable, and point_key uses the same rule so keys survive the trip.
    # allow_nan=False: JSON has no NaN or Infinity, and a file holding them is not JSON for other readers.
    return json.dumps(value, default=str, allow_nan=False, **kwargs)


def point_key(row: dict) -> str:
    """Identity of a point: canonical JSON (sorted keys, nested too) of the ``KEY_FIELDS`` of ``row``.

    Raises:
        ConfigError: if ``row`` lacks one of the key fields.
    """
    missing = [k for k in KEY_FIELDS if k not in row]
    if missing:
        raise ConfigError(f"result row lacks identity field(s) {', '.join(missing)}; required: {', '.join(KEY_FIELDS)}")
    return _dumps({k: row[k] for k in KEY_FIELDS}, sort_keys=True, separators=(",", ":"))


def _keep_first_finished(index: dict[str, dict], row: dict, key: KeyFn) -> None:
    """Add ``row`` to ``index`` (identity -> row) unless it is unfinished, of another kind, or a later duplicate."""
    if row.get("status") not in DONE_STATUSES:
        return
    identity = key(row)
    if identity is not None:
        index.setdefault(identity, row)


def first_finished(rows: Iterable[dict], key: KeyFn = point_key) -> dict[str, dict]:
    """The rule every reader of results applies to a point written more than once: the first finished row (status in
    ``DONE_STATUSES``) of each identity wins, in the order of ``rows``; unfinished rows are ignored.

    Returns:
        ``{identity: row}`` in order of first appearance.
    """
    index: dict[str, dict] = {}
    for row in rows:
        _keep_first_finished(index, row, key)
    return index


def _is_nonfinite(value: Any) -> bool:
    """Whether ``value`` holds a NaN or infinite float (in lists and dicts too)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_is_nonfinite(v) for v in value)
    if isinstance(value, dict):
        return any(_is_nonfinite(v) for v in value.values())
    return False


def _null_nonfinite(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in lists too) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_null_nonfinite(v) for v in value]
    return value


def mark_nonfinite(row: dict) -> dict:
    """``row`` as a ``nonfinite`` point if its status is ``ok`` but its nll or ppl is NaN or infinite, else ``row``.

    A marked row has every non-finite value of ``SCORE_FIELDS`` null (a finite nll whose ppl overflowed stays) and an
    ``error`` naming what was found. The sweep applies this before writing, and ``ResultStore`` when reading rows of an
    older lce, which wrote them as ``ok`` with NaN.
    """
    bad = {k: row[k] for k in ("nll", "ppl") if isinstance(row.get(k), float) and not math.isfinite(row[k])}
    if row.get("status") != OK or not bad:
        return row
    nulled = {k: _null_nonfinite(row[k]) for k in SCORE_FIELDS if k in row}
    error = "non-finite result: " + ", ".join(f"{k}={v}" for k, v in bad.items())
    return {**row, **nulled, "status": NONFINITE, "error": error}


def _json_line(row: dict) -> str:
    """``row`` as one line of JSON.

    Raises:
        ValueError: if a field holds NaN or infinity (a bug: the sweep records non-finite results as null).
    """
    bad = [k for k, v in row.items() if _is_nonfinite(v)]
    if bad:
        raise ValueError(f"result row not written: field(s) {', '.join(bad)} hold NaN or infinity, which JSON cannot "
                         "represent")
    return _dumps(row) + "\n"


@dataclass
class _Scan:
    """How far ``ResultStore._scan`` has read the file for one key function, and the finished rows it found."""

    file_id: tuple[int, int]
    offset: int = 0  # bytes of whole rows read
    lines: int = 0  # newlines in them, for line numbers in messages
    index: dict[str, dict] = field(default_factory=dict)


class ResultStore:
    """Rows of a sweep, one JSON object per line, safe against a kill at any moment and shared by processes.

    Parallel jobs of one experiment (``hydra/launcher=local`` or ``slurm``) append to the same file: writers hold an
    exclusive ``flock`` on ``<file>.lock`` and readers a shared one, so no reader sees half a line and no writer's
    tail repair cuts another's row (``flock`` is advisory and works across processes of one machine and on Linux NFS
    mounts, where it is mapped to POSIX locks). The file is append-only while a store reads it: ``finished`` and
    ``append_unless_done`` read only what was appended since their last call (a file replaced or shrunk is read
    again from the start).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._scans: dict[KeyFn, _Scan] = {}

    @property
    def lock_path(self) -> Path:
        """The lock file writers and readers ``flock``."""
        return self.path.with_name(self.path.name + ".lock")

    def check_writable(self) -> None:
        """Check, before any work, that rows can be appended: the directory exists or can be created, and the lock
        file and the results file (if it exists) open for appending. Creates the directory and the lock file, as the
        first append would, but not the results file.

        Raises:
            LceError: one line naming the path and why it cannot be written.
        """
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            reason = unwritable_reason(directory) or f"{directory} cannot be created ({e.strerror})"
            raise LceError(f"cannot write results to {self.path}: {reason}") from None
        for target in (self.lock_path, self.path):
            existed = target.exists()
            if target == self.path and not existed:
                continue
            try:
                with open(target, "a"):
                    pass
            except OSError as e:
                reason = (f"{target} is a directory" if isinstance(e, IsADirectoryError)
                          else f"{target} is not writable ({e.strerror})" if existed
                          else f"the directory {directory} is not writable ({e.strerror})")
                raise LceError(f"cannot write results to {self.path}: {reason}") from None

    def append(self, row: dict) -> None:
        """Write ``row`` as one line and fsync it before returning (whatever the file already holds)."""
        line = _json_line(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(exclusive=True):
            self._repair_tail()
            self._write(line)

    def append_unless_done(self, row: dict, key: KeyFn) -> dict:
        """Append ``row`` unless the file already holds a finished row of its identity ``key(row)``; return the row
        kept.

        The check runs under the writers' lock, so of several processes that computed one point at once (a relaunched
        job, a requeue) exactly one writes it and all of them get that row back. The returned row is as read back
        from JSON, so it equals what ``rows()`` gives later.
        """
        identity = key(row)
        if identity is None:
            raise ConfigError(f"append_unless_done: {getattr(key, '__name__', key)} gives this row no identity")
        line = _json_line(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(exclusive=True):
            self._repair_tail()
            kept = self._scan(key).get(identity)
            if kept is None:
                self._write(line)
                return json.loads(line)
        return copy.deepcopy(kept)

    def finished(self, key: KeyFn) -> dict[str, dict]:
        """``first_finished(self.rows(), key)``: the finished row of each identity, by identity."""
        if not self.path.exists():
            return {}
        with self._locked(exclusive=False):
            return copy.deepcopy(self._scan(key))

    def rows(self) -> list[dict]:
        """All rows, in file order, duplicates included; a corrupt last line (a kill mid-write) is skipped with a
        warning, any other is an error."""
        if not self.path.exists():
            return []
        with self._locked(exclusive=False):
            data = self.path.read_bytes()
        return self._parse_rows(data, 1)[0]

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        try:
            lock = open(self.lock_path, "a")  # noqa: SIM115 - closed below
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

    def _write(self, line: str) -> None:
        """Append ``line`` and fsync it (the caller holds the exclusive lock)."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _scan(self, key: KeyFn) -> dict[str, dict]:
        """The finished rows by identity (``first_finished``), updated with the rows appended since the last scan
        with ``key`` (the caller holds a lock)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._scans.pop(key, None)
            return {}
        scan = self._scans.get(key)
        if scan is None or scan.file_id != (stat.st_dev, stat.st_ino) or stat.st_size < scan.offset:
            scan = self._scans[key] = _Scan((stat.st_dev, stat.st_ino))
        with open(self.path, "rb") as f:
            f.seek(scan.offset)
            data = f.read()
        rows, consumed = self._parse_rows(data, scan.lines + 1)
        for row in rows:
            _keep_first_finished(scan.index, row, key)
        scan.offset += consumed
        scan.lines += data.count(b"\n", 0, consumed)
        return scan.index

    def _parse_rows(self, data: bytes, first_line: int) -> tuple[list[dict], int]:
        """The rows of ``data`` (file bytes from the start of line ``first_line``) and how many bytes they span.

        A corrupt last line (a kill mid-write) is left out, with a warning and outside the span, so that it is read
        again once repaired; a corrupt line before another is an error.
        """
        lines = data.split(b"\n")
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        rows, consumed = [], 0
        for i, line in enumerate(lines[: last + 1]):
            if line.strip():
                row = _parse(line)
                if row is None and i == last:
                    warnings.warn(
                        f"{self.path}:{first_line + i}: ignoring a truncated or corrupt last line (a sweep killed "
                        "mid-write?); that point will be recomputed",
                        stacklevel=3,
                    )
                    break
                if row is None:
                    raise LceError(
                        f"{self.path}:{first_line + i}: not a JSON object; fix or delete this line to resume"
                    )
                rows.append(row)
            consumed += len(line) + 1
        return rows, min(consumed, len(data))

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
    """The JSON object on ``line`` (an older lce's NaN results read as ``nonfinite``), or None if it is not one."""
    try:
        row = json.loads(line)
    except ValueError:  # also covers a UTF-8 sequence cut in half
        return None
    return mark_nonfinite(row) if isinstance(row, dict) else None


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
    OOM record; a NaN or infinite score is a ``nonfinite`` record (``mark_nonfinite``)."""
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
        return {**common, "status": OOM, **dict.fromkeys(SCORE_FIELDS), "tokens_per_s": None, **stamp,
                "error": error}
    fields = score.row_fields()
    for bound in ("ppl_low", "ppl_high"):
        # exp() of a finite bound beyond a float's range: the interval is unbounded there, which null says.
        if fields[bound] == math.inf:
            fields[bound] = None
    return mark_nonfinite({
        **common, "status": OK, **fields, "tokens_per_s": score.tokens / seconds if seconds > 0 else None, **stamp,
    })


def _check_meta(meta: dict) -> None:
    missing = [k for k in META_FIELDS if k not in meta]
    check(not missing, "meta", f"missing identity field(s) {', '.join(missing)}; required: {', '.join(META_FIELDS)}")
    clash = [k for k in MEASURED_FIELDS if k in meta]
    check(not clash, "meta", f"field(s) {', '.join(clash)} are written by the sweep itself; rename them")
    nonfinite = [k for k, v in meta.items() if _is_nonfinite(v)]
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

    shard = shard if shard is not None else current_shard()

    # Only the main process reads the store, so that every process skips the same points (the collectives of a
    # point must be entered by all of them) even if the file is not shared or changes meanwhile. A failure there
    # is sent to the others, which would otherwise wait for its rows forever.
    done: dict[str, dict] | str | None = None
    if shard.is_main:
        try:
            store.check_writable()
            done = store.finished(point_key)
        except LceError as e:
            shard.broadcast(str(e))
            raise
    done = shard.broadcast(done)
    if isinstance(done, str):
        raise LceError(f"the main process cannot use the result store: {done}")

    nll_fn = protocol_nll_fn(protocol, model, chunk_size, device)
    bar = tqdm(lengths, desc="ppl vs length", unit="len", disable=not (progress and shard.is_main))
    for length in bar:
        key = point_key({**meta, "length": length})
        bar.set_postfix_str(f"length={length}")
        if key not in done:
            row = {**meta, **_measure_point(nll_fn, docs, length, protocol=protocol, bos_id=bos_id,
                                            batch_size=batch_size, device=device, shard=shard)}
            if shard.is_main:
                # Another run of this sweep may have written the point meanwhile: then its row is the result.
                row = store.append_unless_done(row, point_key)
            done[key] = shard.broadcast(row)
        ppl, status = done[key]["ppl"], done[key]["status"]
        bar.set_postfix_str(f"length={length} ppl={ppl:.4g}" if status == OK else f"length={length} {status}")

    identity = point_key({**meta, "length": None})
    mine = [row for row in done.values() if point_key({**row, "length": None}) == identity]
    return sorted(mine, key=lambda row: row["length"])
