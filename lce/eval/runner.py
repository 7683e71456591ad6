"""The resumable point runner every evaluation measures through: the perplexity sweep (one point per length) and
retrieval (one point per length, depth and trial).

A point is identified by a key function of its row (``lce.eval.store.point_key``, ``lce.eval.retrieval
.retrieval_key``). ``PointRunner`` reads the finished points once, before any work, so that a rerun skips them;
measures only what is missing; appends each new row as soon as it is measured (``ResultStore.append_unless_done``:
of two runs that measured a point at once, the first to append wins and both keep its row); and returns the rows of
one series. Running out of memory is a result, not a crash (``measure``: the first line of the message becomes the
row's ``error``), and so is a NaN or infinite score (``lce.eval.store.mark_nonfinite``).

Under a multi-process launcher only the main process reads and writes the store, and every process gets the same
rows: the main one broadcasts what it read and each row it kept, so that every process skips the same points (a
sharded point's collectives must be entered by all of them). Work that is not sharded runs on the main process
alone (``lce.eval.shard.run_on_main``).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch

from lce.errors import LceError
from lce.eval.memory import measure_peak_memory
from lce.eval.shard import Shard
from lce.eval.store import KeyFn, ResultStore, mark_nonfinite, point_key

OOM_MESSAGES = ("out of memory", "can't allocate memory", "DefaultCPUAllocator")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CUDA or CPU) rather than a bug."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in OOM_MESSAGES)


def utc_now() -> str:
    """The ``time`` field of a row: UTC, ISO 8601, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _free_memory(device: torch.device | str | None) -> None:
    gc.collect()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Measured:
    """What ``measure`` saw of one piece of work.

    Attributes:
        value: what the work returned; None when it ran out of memory.
        error: the first line of the out-of-memory message, or None.
        seconds: wall time of the work.
        peak_mem_mb, mem_kind: its peak memory (``lce.eval.memory``).
    """

    value: Any
    error: str | None
    seconds: float
    peak_mem_mb: float | None
    mem_kind: str


def measure(work: Callable[[], Any], device: torch.device | str | None) -> Measured:
    """Run ``work()`` measuring its wall time and peak memory; an allocation failure is returned, not raised.

    Raises:
        Exception: whatever ``work`` raises that is not an allocation failure (``is_out_of_memory``).
    """
    value, error = None, None
    start = time.perf_counter()
    with measure_peak_memory(device) as mem:
        try:
            value = work()
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            error = (str(e).strip().splitlines() or [type(e).__name__])[0]
    seconds = time.perf_counter() - start
    if error is not None:
        # The exception (and the tensors its traceback pinned) is gone once the except block ends; free it now.
        _free_memory(device)
    return Measured(value, error, seconds, mem.peak_mb, mem.kind)


class PointRunner:
    """The finished points of one store and the recording of new ones, on every process of ``shard``.

    Args:
        store: the result store; checked to be writable (``ResultStore.check_writable``) before any work.
        key: the identity of a row of this evaluation; None for rows of other kinds the store may hold.
        shard: the processes taking part; every one must construct the runner and record the same points.

    Raises:
        LceError: the store cannot be written (on every process).
    """

    def __init__(self, store: ResultStore, key: KeyFn, shard: Shard):
        self.store, self.key, self.shard = store, key, shard
        done: dict[str, dict] | str | None = None
        if shard.is_main:
            try:
                store.check_writable()
                done = store.finished(key)
            except LceError as e:
                shard.broadcast(str(e))  # the others would otherwise wait for the rows forever
                raise
        done = shard.broadcast(done)
        if isinstance(done, str):
            raise LceError(f"the main process cannot use the result store: {done}")
        self._done: dict[str, dict] = done

    def finished(self, identity: dict) -> dict | None:
        """The finished row of the point ``identity`` (a row's identity fields), or None if it is still to do."""
        return self._done.get(self.key(identity))

    def record(self, identity: dict, measured: dict) -> dict:
        """Append the row ``{**identity, **measured}`` (``mark_nonfinite``) unless another run wrote the point
        meanwhile; return the row kept, the same on every process."""
        row = mark_nonfinite({**identity, **measured})
        if self.shard.is_main:
            row = self.store.append_unless_done(row, self.key)
        row = self._done[self.key(identity)] = self.shard.broadcast(row)
        return row

    def series_rows(self, series: dict, order: Callable[[dict], Any]) -> list[dict]:
        """Every finished row whose identity fields other than the length equal ``series``'s (earlier runs' and
        new; of a point written twice, the first), sorted by ``order``."""
        identity = point_key({**series, "length": None})
        return sorted((row for row in self._done.values() if point_key({**row, "length": None}) == identity),
                      key=order)
