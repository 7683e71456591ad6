"""Peak-memory measurement: sees an allocation, and its sampler thread always stops."""

import threading
import time

import pytest
import torch

from lce.eval.memory import measure_peak_memory


def sampler_threads():
    return [t for t in threading.enumerate() if t.name == "lce-rss-sampler"]


def test_cpu_peak_memory_sees_an_allocation_and_always_stops_its_thread():
    with measure_peak_memory("cpu") as mem:
        block = torch.ones(16 * 2**20)  # 64 MiB, written so its pages are resident
        time.sleep(0.2)  # the sampler thread (2 ms interval) needs scheduling on a busy machine
        del block
    assert mem.kind == "cpu_rss_delta" and mem.peak_mb > 32
    with pytest.raises(KeyError), measure_peak_memory("cpu") as failed:
        raise KeyError("boom")
    assert failed.kind == "cpu_rss_delta" and failed.peak_mb >= 0
    assert sampler_threads() == []
