"""The append-only JSONL file every evaluation writes its rows to, and the rules for reading it back.

A row is appended and fsynced as soon as it is measured, so a killed evaluation loses at most the row in flight.
Two runs of one evaluation into one file at once (a relaunched job, a SLURM requeue) may both measure a point, but
only the first to append it writes it (``ResultStore.append_unless_done`` checks again under the writers' lock). A
file written by an older lce may still hold a point twice; every reader (``lce.eval.runner``, ``lce.eval.report``,
``lce report``) then takes the first finished row of each identity (``first_finished``).

No row holds NaN or infinity: JSON has neither, and a file holding them is not JSON for other readers. A perplexity
row whose score is not finite is written as ``status: "nonfinite"`` with the bad fields null (``mark_nonfinite``),
and rows of an older lce with status "ok" and a NaN or infinite ppl or nll are read back that way.

The row schema of perplexity points is in ``lce.eval.sweep``, that of retrieval trials in ``lce.eval.retrieval``.
"""

from __future__ import annotations

import copy
import fcntl
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lce.errors import ConfigError, LceError
from lce.paths import unwritable_reason

KEY_FIELDS = ("run", "method", "params", "model", "length", "seed", "protocol")
META_FIELDS = tuple(k for k in KEY_FIELDS if k != "length")
SCORE_FIELDS = (
    "ppl", "nll", "tokens", "aggregation", "windows", "token_nll", "bucket_size", "bucket_nll", "bucket_tokens",
    "ppl_low", "ppl_high", "confidence",
)
OK, OOM, NONFINITE = "ok", "oom", "nonfinite"
DONE_STATUSES = (OK, OOM, NONFINITE)

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


def has_nonfinite(value: Any) -> bool:
    """Whether ``value`` holds a NaN or infinite float (in lists and dicts too)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(has_nonfinite(v) for v in value)
    if isinstance(value, dict):
        return any(has_nonfinite(v) for v in value.values())
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
    ``error`` naming what was found. The point runner (``lce.eval.runner``) applies this before writing, and
    ``ResultStore`` when reading rows of an older lce, which wrote them as ``ok`` with NaN.
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
        ValueError: if a field holds NaN or infinity (a bug: the point runner records non-finite results as null).
    """
    bad = [k for k, v in row.items() if has_nonfinite(v)]
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
    """Rows of an evaluation, one JSON object per line, safe against a kill at any moment and shared by processes.

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

