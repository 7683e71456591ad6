"""Peak memory of a block of code: CUDA allocator statistics on GPU, sampled process RSS on CPU.

On CUDA the allocator tracks its own high-water mark exactly; ``peak_mb`` is ``max_memory_allocated`` since entry,
which includes everything already allocated (model weights too). On CPU there is no such counter, so a daemon
thread samples the process RSS every ``interval_s`` and reports the highest sample minus the RSS at entry. That is a
lower bound: a spike shorter than the sampling interval can be missed, and memory the allocator keeps from earlier
work is reused without raising RSS.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import torch

MB = 2**20


@dataclass
class PeakMemory:
    """Filled in when the ``measure_peak_memory`` block exits.

    Attributes:
        peak_mb: peak memory in MiB (see ``kind``); NaN until the block exits.
        kind: ``"cuda_allocated"`` (absolute allocator peak) or ``"cpu_rss_delta"`` (sampled RSS peak above entry).
    """

    peak_mb: float = float("nan")
    kind: str = ""


@contextmanager
def measure_peak_memory(device: torch.device | str | None = None, interval_s: float = 0.002) -> Iterator[PeakMemory]:
    """Measure the peak memory of the ``with`` block; the result is filled in on exit, also when the block raises.

    Args:
        device: the device the block runs on; ``None`` means the current CUDA device when CUDA is available, else CPU.
        interval_s: RSS sampling interval on CPU.

    Yields:
        A ``PeakMemory`` whose fields are set when the block exits.
    """
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield result
        finally:
            torch.cuda.synchronize(device)
            result.peak_mb = torch.cuda.max_memory_allocated(device) / MB
            result.kind = "cuda_allocated"
        return

    sampler = _RssSampler(interval_s)
    sampler.start()
    try:
        yield result
    finally:
        result.peak_mb = sampler.stop() / MB
        result.kind = "cpu_rss_delta"


class _RssSampler(threading.Thread):
    """Daemon thread recording the highest RSS of this process above its RSS at construction."""

    def __init__(self, interval_s: float):
        super().__init__(name="lce-rss-sampler", daemon=True)
        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._baseline = self._process.memory_info().rss
        self._peak = self._baseline

    def run(self) -> None:
        # Event.wait both paces the sampling and lets stop() end the thread without waiting a full interval.
        while not self._stopped.wait(self._interval_s):
            self._sample()

    def _sample(self) -> None:
        self._peak = max(self._peak, self._process.memory_info().rss)

    def stop(self) -> int:
        """Stop sampling and return the peak RSS above the baseline, in bytes."""
        self._stopped.set()
        self.join()
        self._sample()
        return self._peak - self._baseline
