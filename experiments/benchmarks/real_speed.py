"""Perplexity-evaluation speed of a real model on CPU: lce's path under each method against plain transformers.

For each length, one process times the forward + next-token loss of one random sequence (each call after a warm-up
call on 256 tokens) in ``--repeats`` rounds, each round timing every implementation once in turn, and keeps each
implementation's fastest call (on a shared CPU the minimum is the statistic that other processes disturb least;
every call does the same work, and interleaving the implementations exposes them to the same drifts of the
machine's speed, which on the 2-core machine reach 20% between minutes):

- ``transformers``: the unpatched model as a new user runs it, ``model(ids, labels=ids).loss`` under
  ``torch.inference_mode`` with transformers' default attention (SDPA);
- ``lce <method>``: ``lce.patch(model, method)`` then lce's evaluation path (``lce.eval.perplexity.model_nll_fn``:
  hidden states, then the loss in chunks of rows, never ``T x V`` logits at once).

Where the time goes is read with forward hooks on the decoder layers: ``attention`` (each layer's ``self_attn``,
projections and rotary included), ``mlp``, ``loss`` (everything after the last hidden state: head and
cross-entropy) and ``other`` (embeddings, norms, residual adds, the model's Python between modules). Peak memory is
the sampled RSS peak above the memory in use before the call (``lce.eval.memory``).

    python experiments/benchmarks/real_speed.py --lengths 4096 8192 16384 --dtype bfloat16 \
        --out experiments/results/real_extrapolation/speed

Writes ``speed.csv`` (long format) and ``speed.png`` (time per length; each method's time relative to lce's RoPE
with the time split), and prints a table with each method's time relative to plain transformers and to lce's RoPE
(the overhead of the method itself).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Point, write_csv

#: Methods as in conf/experiment/real_retrieval.yaml (parameters for 2L = 16384 on an 8192-token model).
METHODS = {
    "rope": {"name": "rope"},
    "yarn": {"name": "yarn", "factor": 2},
    "dca": {"name": "dca"},
    "self_extend": {"name": "self_extend", "group_size": 3, "neighbor_window": 1024},
    "rerope": {"name": "rerope", "window": 512},
    "sinks": {"name": "sinks", "start_size": 4, "recent_size": 8188},
}


class Stopwatch:
    """Wall time spent inside the ``self_attn`` and ``mlp`` modules of every decoder layer and inside the base model,
    by forward pre/post hooks (modules of one kind never nest, so the sums do not double count)."""

    def __init__(self, model):
        self.totals: dict[str, float] = defaultdict(float)
        self._open: dict[int, float] = {}
        self._handles = []
        base = model.get_decoder()
        self._watch(base, "model")
        for layer in base.layers:
            self._watch(layer.self_attn, "attention")
            self._watch(layer.mlp, "mlp")

    def _watch(self, module, kind: str) -> None:
        def start(mod, args, kwargs=None):
            self._open[id(mod)] = time.perf_counter()

        def stop(mod, args, *rest):
            self.totals[kind] += time.perf_counter() - self._open.pop(id(mod))

        self._handles += [module.register_forward_pre_hook(start, with_kwargs=True),
                          module.register_forward_hook(stop, with_kwargs=True)]

    def reset(self) -> None:
        self.totals.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def timed(fn, warm, watch: Stopwatch) -> dict[str, float]:
    """``warm()`` (the same call on a short input: kernels and caches initialised), then one timed ``fn()``: its total,
    attention, mlp, loss and other milliseconds, and its peak MiB."""
    from lce.eval.memory import measure_peak_memory

    warm()
    watch.reset()
    with measure_peak_memory(torch.device("cpu"), interval_s=0.005) as peak:
        start = time.perf_counter()
        fn()
        total = time.perf_counter() - start
    parts = dict(watch.totals)
    ms = {"ms": total * 1e3, "attention_ms": parts.get("attention", 0.0) * 1e3, "mlp_ms": parts.get("mlp", 0.0) * 1e3}
    ms["loss_ms"] = (total - parts.get("model", 0.0)) * 1e3
    ms["other_ms"] = ms["ms"] - ms["attention_ms"] - ms["mlp_ms"] - ms["loss_ms"]
    ms["peak_mib"] = peak.peak_mb
    return ms


def fastest(calls: list[dict[str, float]]) -> dict[str, float]:
    """The fastest call's times, with the peak memory of all calls."""
    best = dict(min(calls, key=lambda call: call["ms"]))
    best["peak_mib"] = max(call["peak_mib"] for call in calls)
    return best


def implementation(model, impl: str):
    """``run(ids)``, one forward + loss of ``model`` as ``impl`` computes it: plain transformers, or ``lce <method>``
    (``model`` patched with the method, then lce's evaluation path). Patches replace each other, so every call
    patches first; one model serves every impl (copies would multiply the memory the allocator juggles, and with it
    the timing noise)."""
    import lce
    from lce.eval.perplexity import model_nll_fn

    if impl == "transformers":
        if lce.patch_spec(model) is not None:
            lce.unpatch(model)

        def run(ids):
            with torch.inference_mode():
                return model(ids, labels=ids).loss

        return run
    lce.patch(model, METHODS[impl.removeprefix("lce ")])
    return model_nll_fn(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="an lce model spec (name, hub id or path)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds over all implementations; each one's fastest call is kept")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/real_speed"))
    args = parser.parse_args()

    import lce

    torch.set_num_threads(args.threads)
    model, _ = lce.load_model(args.model, **({} if args.dtype == "float32" else {"dtype": args.dtype}))
    vocab = model.config.vocab_size
    env = {"date": datetime.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
           "transformers": __import__("transformers").__version__, "lce": lce.__version__, "model": args.model,
           "dtype": args.dtype}
    impls = ["transformers", *(f"lce {name}" for name in args.methods)]
    watch = Stopwatch(model)
    points: list[Point] = []
    for length in args.lengths:
        ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length))
        calls = defaultdict(list)
        for _ in range(args.repeats):  # rounds over every impl: drifts of the machine's speed hit all of them alike
            for impl in impls:
                run = implementation(model, impl)
                calls[impl].append(timed(functools.partial(run, ids), functools.partial(run, ids[:, :256]), watch))
        for impl in impls:
            result = fastest(calls[impl])
            points += [Point("forward+loss", impl, length, metric, value) for metric, value in result.items()]
            print(f"{length:>6} {impl:<18} {result['ms'] / 1e3:7.2f} s  attention {result['attention_ms'] / 1e3:6.2f}"
                  f"  mlp {result['mlp_ms'] / 1e3:6.2f}  loss {result['loss_ms'] / 1e3:5.2f}  other "
                  f"{result['other_ms'] / 1e3:5.2f}  peak {result['peak_mib']:7.0f} MiB", flush=True)
    watch.remove()
    print(f"wrote {write_csv(points, env, args.out / 'speed.csv')}")
    print(f"wrote {plot(points, args.out / 'speed.png', env)}")
    summary(points)


def summary(points: list[Point]) -> None:
    """Each method's time relative to plain transformers and to lce's RoPE, per length."""
    from rich.console import Console
    from rich.table import Table

    ms = {(p.impl, p.length): p.value for p in points if p.metric == "ms"}
    lengths = sorted({length for _, length in ms})
    table = Table(title="forward + loss: time / plain transformers (time / lce rope)")
    table.add_column("impl")
    for length in lengths:
        table.add_column(str(length), justify="right")
    for impl in dict.fromkeys(impl for impl, _ in ms):
        cells = []
        for length in lengths:
            t, base, rope = ms.get((impl, length)), ms.get(("transformers", length)), ms.get(("lce rope", length))
            cells.append("" if t is None or base is None else
                         f"{t / base:.2f}x" + (f" ({t / rope:.2f}x)" if rope and impl.startswith("lce") else ""))
        table.add_row(impl, *cells)
    Console().print(table)


PARTS = ("attention", "mlp", "loss", "other")


def plot(points: list[Point], path: Path, env: dict) -> Path:
    """Left: seconds per length for every implementation (log-log). Right: each lce method's time relative to lce's
    RoPE at each length, as bars split into attention / MLP / loss / other (the RoPE bar is 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lce.eval.report import series_style

    value = {(p.impl, p.length, p.metric): p.value for p in points}
    impls = list(dict.fromkeys(p.impl for p in points))
    lengths = sorted({p.length for p in points})
    methods = [impl for impl in impls if impl.startswith("lce ")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    for index, impl in enumerate(impls):
        color, marker = series_style(index)
        xs = [length for length in lengths if (impl, length, "ms") in value]
        left.plot(xs, [value[(impl, x, "ms")] / 1e3 for x in xs], marker=marker, color=color, label=impl)
    left.set(xscale="log", yscale="log", xlabel="tokens", ylabel="forward + loss (s)")
    left.set_xscale("log", base=2)
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    width = 0.8 / max(len(lengths), 1)
    for slot, length in enumerate(lengths):
        rope = value.get(("lce rope", length, "ms"))
        if not rope:
            continue
        xs = [i + (slot - (len(lengths) - 1) / 2) * width for i in range(len(methods))]
        bottom = [0.0] * len(methods)
        for part_index, part in enumerate(PARTS):
            heights = [value.get((impl, length, f"{part}_ms"), 0.0) / rope for impl in methods]
            right.bar(xs, heights, width * 0.95, bottom=bottom, color=f"C{part_index}", alpha=0.35 + 0.5 * slot /
                      max(len(lengths) - 1, 1), label=f"{part}" if slot == len(lengths) - 1 else None)
            bottom = [b + h for b, h in zip(bottom, heights)]
        for x, total in zip(xs, bottom):
            right.text(x, total, f"{length // 1024}k", ha="center", va="bottom", fontsize=6)
    right.axhline(1.0, color="black", lw=0.8)
    right.axhline(1.3, color="grey", lw=0.8, ls="--")
    right.set_xticks(range(len(methods)), [impl.removeprefix("lce ") for impl in methods], fontsize=8)
    right.set_ylabel("time / lce rope (split by part)")
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"{env['model']} {env['dtype']}, {env['threads']} threads, torch {env['torch']}, transformers "
                 f"{env['transformers']} ({env['date']})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
