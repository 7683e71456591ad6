"""Measuring implementations side by side: timing, peak memory, long-format CSV, a plot and a ratio table.

Every benchmark in this folder builds, per (case, length), a set of named implementations of one computation and
hands them to ``measure``: each is checked against the first (the reference) at a small length, then timed (median of
``repeats`` after ``warmup`` runs) and its peak memory taken, all in one process so the ratios compare like with like.
A point that runs out of memory is recorded as such and the benchmark goes on.

Time: CUDA events on GPU (after synchronising), ``time.perf_counter`` on CPU. Memory: the CUDA allocator's peak above
the memory in use before the call on GPU; on CPU the sampled RSS peak above entry (``lce.eval.memory``), a lower
bound that reads ~0 for short calls, so CPU memory comparisons rest on the buffers each method allocates by design.
"""

from __future__ import annotations

import csv
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lce.eval.memory import measure_peak_memory

Impl = Callable[[], torch.Tensor]


@dataclass
class Point:
    """One measurement row of the long-format CSV."""

    case: str
    impl: str
    length: int
    metric: str  # ms | peak_mib | tokens_per_s | max_abs_err | status
    value: float | str
    extra: dict = field(default_factory=dict)


def add_common_arguments(parser, out: str) -> None:
    """The options every benchmark takes: dtype, timing, device, the interpreter switch and the output folder."""
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--interpreted-triton", action="store_true",
                        help="time the Triton kernels in the CPU interpreter too (meaningless numbers, for checks)")
    parser.add_argument("--out", type=Path, default=Path(out))


def report(points: list[Point], env: dict, out: Path, stem: str, title: str) -> None:
    """Write ``<stem>.csv`` and ``<stem>.png`` under ``out`` and print the tables and ratios of lce's paths."""
    print(f"wrote {write_csv(points, env, out / f'{stem}.csv')}")
    print(f"wrote {plot(points, out / f'{stem}.png', title)}")
    print_summary(points, subjects=["lce_ref", "lce_triton"])


def environment(device: torch.device) -> dict:
    """What the numbers were measured on (goes into every CSV row)."""
    info = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = ""
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Impl, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_mib(fn: Impl, device: torch.device) -> float:
    """Peak memory of one ``fn()`` call above what was in use before it."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with measure_peak_memory(device, interval_s=0.0005) as peak:
        fn()
    return peak.peak_mb


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def measure(case: str, length: int, impls: dict[str, Impl], device: torch.device, tokens: int, warmup: int = 1,
            repeats: int = 3) -> list[Point]:
    """Time and memory of each implementation; ``tokens`` processed per call gives tokens/s."""
    points = []
    for name, fn in impls.items():
        try:
            ms = time_ms(fn, device, warmup, repeats)
            mib = peak_mib(fn, device)
        except (RuntimeError, MemoryError) as error:
            if not is_oom(error) and not isinstance(error, MemoryError):
                raise
            points.append(Point(case, name, length, "status", "oom"))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        points += [Point(case, name, length, "ms", ms), Point(case, name, length, "peak_mib", mib),
                   Point(case, name, length, "tokens_per_s", tokens / (ms / 1e3))]
    return points


def check(case: str, length: int, impls: dict[str, Impl], unlike: tuple[str, ...] = ()) -> list[Point]:
    """Max absolute difference of every implementation from the first one (the reference); ``unlike`` names peers
    that compute something else (a speed yardstick only) and are not compared."""
    outputs = {name: fn().float() for name, fn in impls.items() if name not in unlike}
    reference = next(iter(outputs.values()))
    return [Point(case, name, length, "max_abs_err", float((out - reference).abs().max()))
            for name, out in outputs.items()]


def write_csv(points: list[Point], env: dict, path: Path) -> Path:
    """Long format: one row per (case, impl, length, metric)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    extra_keys = sorted({k for p in points for k in p.extra})
    columns = [*env, "case", "impl", "length", "metric", "value", *extra_keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for p in points:
            writer.writerow({**env, "case": p.case, "impl": p.impl, "length": p.length, "metric": p.metric,
                             "value": p.value, **p.extra})
    return path


def lookup(points: list[Point], metric: str) -> dict[tuple[str, str, int], float]:
    return {(p.case, p.impl, p.length): p.value for p in points if p.metric == metric}


def ratio_rows(points: list[Point], subject: str, peers: list[str]) -> list[tuple[str, int, str, float]]:
    """``(case, length, peer, peer_ms / subject_ms)``: > 1 means ``subject`` is faster than the peer."""
    ms = lookup(points, "ms")
    rows = []
    for (case, impl, length), subject_ms in sorted(ms.items()):
        if impl != subject:
            continue
        for peer in peers:
            peer_ms = ms.get((case, peer, length))
            if peer_ms is not None:
                rows.append((case, length, peer, peer_ms / subject_ms))
    return rows


def print_summary(points: list[Point], subjects: list[str]) -> None:
    """A table per case: ms, peak MiB and the speed ratio of each subject against every other implementation."""
    from rich.console import Console
    from rich.table import Table

    ms, mib, status = lookup(points, "ms"), lookup(points, "peak_mib"), lookup(points, "status")
    err = lookup(points, "max_abs_err")
    console = Console()
    for case in dict.fromkeys(p.case for p in points):
        impls = list(dict.fromkeys(p.impl for p in points if p.case == case and p.metric != "max_abs_err"))
        lengths = sorted({p.length for p in points if p.case == case and p.metric in ("ms", "status")})
        table = Table(title=f"{case}: ms (peak MiB)")
        table.add_column("impl")
        for length in lengths:
            table.add_column(str(length), justify="right")
        table.add_column("max |err|", justify="right")
        for impl in impls:
            cells = []
            for length in lengths:
                key = (case, impl, length)
                cells.append(status.get(key, "") or (f"{ms[key]:.1f} ({mib[key]:.0f})" if key in ms else "-"))
            errors = [v for (c, i, _), v in err.items() if c == case and i == impl]
            table.add_row(impl, *cells, f"{max(errors):.1e}" if errors else "-")
        console.print(table)
        for subject in subjects:
            if subject not in impls:
                continue
            peers = [i for i in impls if i != subject]
            for _, length, peer, ratio in ratio_rows([p for p in points if p.case == case], subject, peers):
                console.print(f"  {case} T={length}: {subject} is {ratio:.2f}x the speed of {peer}")


def plot(points: list[Point], path: Path, title: str) -> Path:
    """Time vs length per case (one panel each), log-log, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lce.eval.report import series_style

    ms = lookup(points, "ms")
    cases = list(dict.fromkeys(case for case, _, _ in ms))
    styles = {impl: series_style(i) for i, impl in enumerate(dict.fromkeys(impl for _, impl, _ in ms))}  # one per impl
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.6), squeeze=False)
    for ax, case in zip(axes[0], cases):
        impls = list(dict.fromkeys(impl for c, impl, _ in ms if c == case))
        for impl in impls:
            xs = sorted(length for c, m, length in ms if c == case and m == impl)
            color, marker = styles[impl]
            ax.plot(xs, [ms[(case, impl, x)] for x in xs], marker=marker, color=color, label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(case)
        ax.set_xlabel("tokens")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
