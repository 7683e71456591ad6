"""Measuring implementations side by side: checked outputs, timing, throughput, peak memory, long-format CSV.

Every benchmark in this folder builds, per (case, length), named implementations of one computation and hands them to
``measure`` with the mode (``fwd``: evaluation, under ``torch.inference_mode``; ``fwd+bwd``: forward plus backward
of a fixed random output gradient). At **every** benchmarked size, before any timing:

1. the case's reference implementation runs once; its output (and, in ``fwd+bwd``, the gradients of its inputs) are
   kept;
2. every other implementation runs once and its output and gradients are compared with the reference: the relative
   max error ``max|x - ref| / max|ref|`` of each tensor is a row (``err_out``, ``err_<input>``); above the dtype's
   tolerance the implementation's status reads ``mismatch`` (it is still timed). Warm-up work (Triton and
   ``torch.compile`` compilation, FlexAttention's block masks) therefore happens here, outside the timing;
3. it is timed: on CUDA with ``triton.testing.do_bench`` (L2 flushed before each call, gradients set to None between
   calls; ``--warmup-ms``/``--rep-ms``), the median and the 20th/80th percentiles recorded; on CPU the median of
   ``--repeats`` wall-clock calls after ``--warmup`` calls;
4. its peak memory above what was allocated before the call is taken (CUDA allocator; a sampled RSS lower bound on
   CPU), and TFLOP/s or GB/s from the case's FLOPs or bytes per call.

A peer that cannot run here (a package not installed, a CUDA-only kernel on CPU) gets one row with status
``unavailable: <reason>``; one that runs out of memory ``oom``; one that raises ``error: <message>`` (its traceback is
printed) and the benchmark goes on. Each row carries the run's environment (date, device, versions, dtype, shapes)
and the implementation's ``backend`` (e.g. SDPA pinned to its flash kernel) in ``extra`` columns.
"""

from __future__ import annotations

import csv
import datetime
import platform
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lce.eval.memory import measure_peak_memory

MODES = ("fwd", "fwd+bwd")

#: Relative max error (against a reference in the same dtype) above which an implementation is reported mismatched:
#: two correct bf16 attentions differ by a few bf16 ulps of the largest value (2^-8 = 3.9e-3 each).
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 4e-2}


@dataclass
class Impl:
    """One implementation of a case.

    Attributes:
        fn: computes the case's output, a tensor or a tuple of tensors (every implementation of a case returns the
            same shapes, or ``to_reference`` maps them there).
        inputs: leaf tensors whose gradients ``fwd+bwd`` compares and clears (named, e.g. ``{"q": q, ...}``).
        backend: what it runs on, recorded in the CSV (e.g. ``sdpa:FLASH_ATTENTION``, ``triton``).
        compare: False for a yardstick that computes something else (a copy, softmax attention): timed only.
        compare_grads: False for an implementation whose gradients differ by design (ChunkLlama's merge detaches
            its weights): its output is still compared.
        to_reference: maps each output and gradient to the reference's layout before the comparison.
    """

    fn: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    backend: str = ""
    compare: bool = True
    compare_grads: bool = True
    to_reference: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Unavailable:
    """A peer that cannot run here, and why (recorded as a status row)."""

    reason: str


@dataclass
class Point:
    """One row of the long-format CSV."""

    case: str
    impl: str
    length: int
    metric: str  # ms | ms_p20 | ms_p80 | tflops | gb_per_s | tokens_per_s | peak_mib | err_* | status
    value: float | str
    extra: dict = field(default_factory=dict)
    mode: str = "fwd"  # fwd | fwd+bwd


@dataclass
class Timing:
    """How to time: CUDA (``do_bench`` milliseconds of warm-up and repetition) and CPU (calls)."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    warmup: int = 1
    repeats: int = 3


def add_common_arguments(parser, out: str) -> None:
    """The options every benchmark takes: dtype, timing, device, modes, the interpreter switch and the output."""
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                        choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                        help="fwd: forward under inference mode; fwd+bwd: forward and backward")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="CUDA: do_bench warm-up time")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="CUDA: do_bench repetition time")
    parser.add_argument("--warmup", type=int, default=1, help="CPU: untimed calls first")
    parser.add_argument("--repeats", type=int, default=3, help="CPU: timed calls (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--interpreted-triton", action="store_true",
                        help="run the Triton kernels in the CPU interpreter too (meaningless times, for checks)")
    parser.add_argument("--out", type=Path, default=Path(out))


def timing(args) -> Timing:
    return Timing(args.warmup_ms, args.rep_ms, args.warmup, args.repeats)


def environment(device: torch.device) -> dict:
    """What the numbers were measured on (goes into every CSV row)."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = ""
    return info


def native_triton(device: torch.device, interpreted: bool) -> bool:
    """Whether lce's Triton rows run: compiled on CUDA, or in the interpreter when asked for (``TRITON_INTERPRET``)."""
    from lce.kernels.backend import interpreting

    return device.type == "cuda" or (interpreted and interpreting())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, timing: Timing,
            grads: Sequence[torch.Tensor] = ()) -> tuple[float, float, float]:
    """``(median, 20th, 80th percentile)`` milliseconds of one ``fn()`` call."""
    if device.type == "cuda":
        from triton.testing import do_bench

        samples = do_bench(fn, warmup=timing.warmup_ms, rep=timing.rep_ms, grad_to_none=list(grads) or None,
                           return_mode="all")
    else:
        for _ in range(timing.warmup):
            fn()
        samples = []
        for _ in range(max(1, timing.repeats)):
            for t in grads:
                t.grad = None
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
    ordered = sorted(samples)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return statistics.median(ordered), quantile(0.2), quantile(0.8)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
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
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(error).lower()


class Step:
    """What one timed call runs: the forward (``fwd``), or forward and backward of a fixed gradient (``fwd+bwd``)."""

    def __init__(self, impl: Impl, mode: str, grad_out: tuple[torch.Tensor, ...] | None):
        self.impl, self.mode, self.grad_out = impl, mode, grad_out

    def __call__(self) -> tuple[torch.Tensor, ...]:
        if self.mode == "fwd":
            with torch.inference_mode():
                return as_tuple(self.impl.fn())
        outs = as_tuple(self.impl.fn())
        torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, self.grad_out)])
        return outs

    def results(self) -> dict[str, torch.Tensor]:
        """Outputs and gradients of one call (cleared gradients first), detached, in the reference's layout."""
        for t in self.impl.inputs.values():
            t.grad = None
        outs = self()
        names = ["out"] if len(outs) == 1 else [f"out{i}" for i in range(len(outs))]
        results = dict(zip(names, (o.detach() for o in outs)))
        if self.mode == "fwd+bwd":
            results.update({name: t.grad for name, t in self.impl.inputs.items() if t.grad is not None})
            for t in self.impl.inputs.values():
                t.grad = None
        if self.impl.to_reference is not None:
            results = {name: self.impl.to_reference(t) for name, t in results.items()}
        return results


def as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    return float((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _grad_out(impl: Impl, mode: str, seed: int) -> tuple[torch.Tensor, ...] | None:
    """A fixed random gradient for each output (``fwd+bwd``), from the shapes of one forward."""
    if mode == "fwd":
        return None
    outs = [o.detach() for o in as_tuple(impl.fn())]  # with autograd on: the graphs compiled here are the timed ones
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(out.shape, generator=gen).to(out.device) for out in outs)


def measure(case: str, mode: str, length: int, impls: dict[str, Impl | Unavailable], reference: str | None,
            device: torch.device, timing: Timing, flops: float | None = None, bytes_moved: float | None = None,
            tokens: int | None = None, dtype: torch.dtype = torch.float32) -> list[Point]:
    """Check, then time, every implementation of ``case`` at ``length`` in ``mode`` (see the module docstring).

    Args:
        reference: the name of the implementation the others are compared with (None or unavailable: no check).
        flops: floating-point operations of one call (gives ``tflops``); bytes_moved: bytes read + written by one
            call (gives ``gb_per_s``); tokens: tokens per call (gives ``tokens_per_s``).
    """
    points: list[Point] = []

    def row(impl, metric, value, **extra):
        points.append(Point(case, impl, length, metric, value, extra, mode))

    ref_results, grad_out = None, None
    runnable = {name: impl for name, impl in impls.items() if isinstance(impl, Impl)}
    if reference in runnable:
        try:
            grad_out = _grad_out(runnable[reference], mode, seed=length)
            ref_results = Step(runnable[reference], mode, grad_out).results()
        except Exception as error:  # noqa: BLE001 - recorded; the others run unchecked
            print(f"{case} {mode} T={length}: the reference {reference} failed: {error!r}", flush=True)
            ref_results = None
    tolerance = TOLERANCE.get(dtype, 1e-3)
    for name, impl in impls.items():
        if isinstance(impl, Unavailable):
            row(name, "status", f"unavailable: {impl.reason}")
            continue
        try:
            if grad_out is None and mode == "fwd+bwd":
                grad_out = _grad_out(impl, mode, seed=length)
            step = Step(impl, mode, grad_out)
            status, mismatched = "ok", []
            if ref_results is not None and name != reference and impl.compare:
                got = step.results()
                for key, want in ref_results.items():
                    if not key.startswith("out") and not impl.compare_grads:
                        continue
                    if key not in got:
                        mismatched.append(f"no {key}")
                        continue
                    err = relative_error(got[key], want)
                    row(name, f"err_{key}", err, backend=impl.backend)
                    if not err <= tolerance:  # NaN fails too
                        mismatched.append(f"err_{key} {err:.2e}")
                del got
                if mismatched:
                    status = f"mismatch: {', '.join(mismatched)} > {tolerance:.0e}"
            elif name == reference and ref_results is None and reference is not None:
                status = "error: it failed as the reference (see the log)"
            elif ref_results is None and impl.compare:
                status = "ok (not checked: no reference ran)"
            grads = list(impl.inputs.values()) if mode == "fwd+bwd" else []
            median, p20, p80 = time_ms(step, device, timing, grads)
            mib = peak_mib(step, device)
        except Exception as error:  # noqa: BLE001 - one failing implementation must not lose the others
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if is_oom(error):
                row(name, "status", "oom", backend=impl.backend)
            else:
                traceback.print_exc()
                message = " ".join(f"{type(error).__name__}: {error}".split())[:300]
                row(name, "status", f"error: {message}", backend=impl.backend)
            continue
        finally:
            for t in impl.inputs.values():
                t.grad = None
        extra = {"backend": impl.backend}
        row(name, "status", status, **extra)
        row(name, "ms", median, **extra)
        row(name, "ms_p20", p20, **extra)
        row(name, "ms_p80", p80, **extra)
        row(name, "peak_mib", mib, **extra)
        if flops:
            row(name, "tflops", flops / (median / 1e3) / 1e12, **extra)
        if bytes_moved:
            row(name, "gb_per_s", bytes_moved / (median / 1e3) / 1e9, **extra)
        if tokens:
            row(name, "tokens_per_s", tokens / (median / 1e3), **extra)
    return points


def failures(points: list[Point], subjects: Sequence[str] = ("lce_triton", "lce_ref")) -> list[Point]:
    """Status rows of lce's own implementations that are neither ok nor unavailable (what fails a run)."""
    return [p for p in points if p.metric == "status" and p.impl in subjects
            and not str(p.value).startswith(("ok", "unavailable"))]


def write_csv(points: list[Point], env: dict, path: Path) -> Path:
    """Long format: one row per (case, mode, impl, length, metric); environment and ``extra`` as columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    extra_keys = sorted({k for p in points for k in p.extra})
    columns = [*env, "case", "mode", "impl", "length", "metric", "value", *extra_keys]
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for p in points:
            writer.writerow({**env, "case": p.case, "mode": p.mode, "impl": p.impl, "length": p.length,
                             "metric": p.metric, "value": p.value, **p.extra})
    tmp.replace(path)  # a run killed while writing leaves the previous complete file
    return path


def lookup(points: list[Point], metric: str) -> dict[tuple[str, str, str, int], float | str]:
    return {(p.case, p.mode, p.impl, p.length): p.value for p in points if p.metric == metric}


def ratio_rows(points: list[Point], subject: str = "lce_triton") -> list[tuple[str, str, int, str, float]]:
    """``(case, mode, length, peer, peer_ms / subject_ms)``: > 1 means ``subject`` is faster than the peer."""
    ms = lookup(points, "ms")
    rows = []
    for (case, mode, impl, length), subject_ms in sorted(ms.items()):
        if impl != subject:
            continue
        for (c, m, peer, n), peer_ms in sorted(ms.items()):
            if (c, m, n) == (case, mode, length) and peer != subject:
                rows.append((case, mode, length, peer, peer_ms / subject_ms))
    return rows


def time_vs_case(points: list[Point], base_case: str, subject: str = "lce_triton"
                 ) -> list[tuple[str, str, int, float]]:
    """``(case, mode, length, subject_ms / subject_ms of base_case)``: what a case costs over the base case."""
    ms = lookup(points, "ms")
    return [(case, mode, length, value / ms[(base_case, mode, subject, length)])
            for (case, mode, impl, length), value in sorted(ms.items())
            if impl == subject and case != base_case and (base_case, mode, subject, length) in ms]


def print_summary(points: list[Point], subject: str = "lce_triton") -> None:
    """A table per (case, mode): ms, throughput, status; then ``subject``'s speed against every peer."""
    from rich.console import Console
    from rich.table import Table

    ms, status = lookup(points, "ms"), lookup(points, "status")
    tflops, gbps = lookup(points, "tflops"), lookup(points, "gb_per_s")
    console = Console(width=160)
    for case, mode in dict.fromkeys((p.case, p.mode) for p in points):
        impls = list(dict.fromkeys(p.impl for p in points if (p.case, p.mode) == (case, mode)))
        lengths = sorted({p.length for p in points if (p.case, p.mode) == (case, mode)})
        table = Table(title=f"{case} {mode}: ms (TFLOP/s or GB/s)")
        table.add_column("impl")
        for length in lengths:
            table.add_column(str(length), justify="right")
        for impl in impls:
            cells = []
            for length in lengths:
                key = (case, mode, impl, length)
                state = str(status.get(key, ""))
                if key in ms:
                    rate = f" ({tflops[key]:.0f})" if key in tflops else f" ({gbps[key]:.0f})" if key in gbps else ""
                    cells.append(f"{ms[key]:.2f}{rate}" + ("" if state == "ok" else f" {state[:40]}"))
                else:
                    cells.append(state[:50] or "-")
            table.add_row(impl, *cells)
        console.print(table)
    for case, mode, length, peer, ratio in ratio_rows(points, subject):
        console.print(f"  {case} {mode} T={length}: {subject} is {ratio:.2f}x the speed of {peer}")
    for case, mode, length, ratio in time_vs_case(points, "causal", subject):
        console.print(f"  {case} {mode} T={length}: {subject} takes {ratio:.2f}x the time of {subject} causal")


def plot(points: list[Point], path: Path, title: str) -> Path:
    """Time vs length, one panel per (case, mode), log-log, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lce.eval.report import series_style

    ms = lookup(points, "ms")
    panels = list(dict.fromkeys((case, mode) for case, mode, _, _ in ms))
    styles = {impl: series_style(i) for i, impl in enumerate(dict.fromkeys(impl for _, _, impl, _ in ms))}
    cols = min(4, max(1, len(panels)))
    rows = -(-len(panels) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (case, mode) in zip(axes.flat, panels):
        for impl in dict.fromkeys(i for c, m, i, _ in ms if (c, m) == (case, mode)):
            xs = sorted(n for c, m, i, n in ms if (c, m, i) == (case, mode, impl))
            color, marker = styles[impl]
            ax.plot(xs, [ms[(case, mode, impl, x)] for x in xs], marker=marker, color=color, label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{case} {mode}")
        ax.set_xlabel("tokens")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(points: list[Point], env: dict, out: Path, stem: str, title: str) -> int:
    """Write ``<stem>.csv`` and ``<stem>.png`` under ``out``, print the tables and ratios; 1 if lce's own rows
    failed (error or mismatch), else 0."""
    print(f"wrote {write_csv(points, env, out / f'{stem}.csv')}")
    if any(p.metric == "ms" for p in points):
        print(f"wrote {plot(points, out / f'{stem}.png', title)}")
    print_summary(points)
    failed = failures(points)
    for p in failed:
        print(f"FAILED: {p.case} {p.mode} T={p.length} {p.impl}: {p.value}")
    return 1 if failed else 0
