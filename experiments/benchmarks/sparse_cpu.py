"""CPU benchmark of the sparse attention variants (issue #15 item 5, CPU half): the block-wise PyTorch paths of
``moba``, ``topk_blocks`` and ``nsa`` (what a CPU runs: backend ``ref``) against dense causal SDPA and FlexAttention,
forward only (inference mode), one head configuration like SmolLM2-135M (9 query heads, 3 KV heads, head dim 64,
batch 1), ``--dtype`` float32 by default.

Cases and implementations, per length (``harness.measure``: the case's reference runs first, the others are checked
against it where they compute the same thing, then each is timed and its peak memory taken):

- ``causal``: ``sdpa`` (``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)``, the reference; the
  yardstick every ratio is taken against) and ``flex`` (compiled FlexAttention, causal ``BlockMask``).
- ``moba``, ``topk_blocks``: ``lce`` is the layer as the patched model calls it
  (``lce.attention.block_selection.SelectedBlocksAttention``: block summaries, per-query top-k, then
  ``lce.kernels.selected_attention.selected_attention``, backend ``ref``), the reference; ``lce_op`` the op alone on
  the same precomputed selection (what the selection costs is ``lce - lce_op``), ``op_masked`` and ``op_block_major``
  each of its two PyTorch forms forced (``function.pytorch_form`` picks between them); ``flex`` compiled
  FlexAttention on the same selection: a ``mask_mod`` reading the per-(head, query, block) selection table, and a
  ``BlockMask`` whose 128 x 128 tiles are those any query of the tile selected (exact output; sparse at tile level
  only when the blocks are at least as large as a tile).
- ``nsa``: ``lce`` is ``lce.attention.nsa.NSALayerAttention`` (``nsa_branches``: compression, selection, selected
  branch by ``selected_attention`` ``ref``, sliding window by lce's block-wise attention; gates from random hidden
  states of width 576) at its swap-time initialisation; ``lce_op`` the selected branch's op alone. FlexAttention is
  not run for NSA (three branches mixed per query, the compression branch's scores decide the selection);
  ``lce_op``, ``op_masked`` and ``op_block_major`` as for the others.

The methods' parameters are their configs' defaults, the papers' (``conf/attention/*.yaml``): MoBA blocks of 512, top
3; Quest pages of 16, top 64 (1024 keys); NSA l=32, d=16, l'=64, n=16, w=512. A (case, implementation) is skipped at a
length, and recorded ``skipped: ...``, when its time at the previous length, scaled by the measured growth (or by
(T2/T1)^2 before two points exist), predicts that its measurement would take more than ``--max-seconds`` (60 s);
sizes with a predicted call over 5 s run one timed call and no warm-up. Memory is ``harness.peak_mib``: the sampled
RSS increase during one call, a lower bound (see ``lce.eval.memory``).

Output: ``<out>/sparse_cpu.csv`` (harness long format, one row per (case, impl, length, metric), rewritten after every
case), ``<out>/ratios.csv`` (time and peak memory of each implementation over SDPA's at that length),
``<out>/sparse_cpu.png``, tables printed.

    python experiments/benchmarks/sparse_cpu.py --out experiments/results/sparse_attention/cpu_bench \\
        --lengths 4096 8192 16384 32768
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Impl, Point, Timing, Unavailable, environment, lookup, measure, write_csv

from lce.attention.block_selection import SelectedBlocksAttention, select_blocks
from lce.attention.moba import MoBA
from lce.attention.nsa import NSA, NSALayerAttention, NSAParameters
from lce.attention.topk_blocks import TopKBlocks
from lce.kernels.backend import use_backend
from lce.kernels.selected_attention import selected_attention, selected_attention_chunked, selected_attention_masked
from lce.kernels.selected_attention.function import pytorch_form

CASES = ("causal", "moba", "topk_blocks", "nsa")
FLEX_TILE = 128  # FlexAttention's default block size (query and key tiles)
CSV_NAME = "sparse_cpu.csv"


class Inputs:
    """Random rotated q ``[B, H, T, D]``, k/v ``[B, HKV, T, D]``, positions ``[B, T]``, hidden states ``[B, T, C]``."""

    def __init__(self, args, length: int):
        gen = torch.Generator().manual_seed(length)
        dtype = getattr(torch, args.dtype)
        self.q = torch.randn(args.batch, args.heads, length, args.head_dim, generator=gen).to(dtype)
        self.k = torch.randn(args.batch, args.kv_heads, length, args.head_dim, generator=gen).to(dtype)
        self.v = torch.randn(args.batch, args.kv_heads, length, args.head_dim, generator=gen).to(dtype)
        self.hidden = torch.randn(args.batch, length, args.hidden, generator=gen).to(dtype)
        self.pos = torch.arange(length)[None].expand(args.batch, length)
        self.scale = args.head_dim ** -0.5


def to_lce_layout(out: torch.Tensor) -> torch.Tensor:
    return out.transpose(1, 2)


class Flex:
    """Compiled FlexAttention; masks built from tile tables with ``BlockMask.from_kv_blocks`` (never a T x T mask)."""

    def __init__(self):
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        torch._dynamo.config.recompile_limit = 256
        torch._dynamo.config.accumulated_recompile_limit = 4096
        self.attention = torch.compile(flex_attention, dynamic=False)
        self.BlockMask = BlockMask

    def mask(self, tiles: torch.Tensor, mask_mod, length: int):
        """``tiles`` bool ``[B, H, nQ, nK]``: the (query tile, key tile) pairs computed, each through ``mask_mod``."""
        tiles = tiles.to(torch.int32)
        counts = tiles.sum(-1).to(torch.int32)
        order = torch.argsort(tiles, dim=-1, descending=True, stable=True).to(torch.int32)
        return self.BlockMask.from_kv_blocks(counts, order, mask_mod=mask_mod, seq_lengths=(length, length))

    def causal_mask(self, length: int):
        n = -(-length // FLEX_TILE)
        tiles = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        return self.mask(tiles, lambda b, h, i, j: i >= j, length)

    def selection_mask(self, chosen: torch.Tensor, block_size: int, length: int, heads: int):
        """The exact pattern of a per-query selection ``chosen [B, HS, T, N]`` of blocks of ``block_size`` keys."""
        batch, sel_heads = chosen.shape[:2]
        blocks = -(-length // block_size)
        table = torch.zeros(batch, sel_heads, length, blocks + 1, dtype=torch.bool)
        table.scatter_(-1, torch.where(chosen < 0, blocks, chosen), True)
        table = table[..., :blocks].repeat_interleave(heads // sel_heads, dim=1).contiguous()  # [B, H, T, nB]
        n_tiles = -(-length // FLEX_TILE)
        padded = F.pad(table, (0, 0, 0, n_tiles * FLEX_TILE - length))
        per_tile = padded.view(batch, heads, n_tiles, FLEX_TILE, blocks).any(3)  # [B, H, nQ, nB]
        key_block = torch.arange(n_tiles * FLEX_TILE) // block_size  # the selection block of each key position
        key_block = key_block.clamp(max=blocks - 1).view(n_tiles, FLEX_TILE)
        tiles = torch.zeros(batch, heads, n_tiles, n_tiles, dtype=torch.bool)
        for offset in range(0, FLEX_TILE, block_size) if block_size < FLEX_TILE else [0]:  # a tile spans small blocks
            tiles |= per_tile[..., key_block[:, offset]]
        tiles &= torch.ones(n_tiles, n_tiles, dtype=torch.bool).tril()

        def mask_mod(b, h, i, j):
            return (i >= j) & table[b, h, i, j // block_size]

        return self.mask(tiles, mask_mod, length)

    def __call__(self, q, k, v, mask):
        return self.attention(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def variants() -> dict:
    """The configs' (papers') defaults."""
    return {"moba": MoBA(), "topk_blocks": TopKBlocks(block_size=16, top_k=64), "nsa": NSA()}


def sdpa_causal(x: Inputs) -> torch.Tensor:
    return to_lce_layout(F.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=True, enable_gqa=True))


def case_impls(case: str, x: Inputs, args, flex) -> tuple[dict, str]:
    """The implementations of ``case`` at ``x``'s length, and the reference's name."""
    length = x.q.shape[2]
    if case == "causal":
        impls = {"sdpa": Impl(lambda: sdpa_causal(x), backend="sdpa (is_causal, enable_gqa)")}
        if isinstance(flex, Unavailable):
            impls["flex"] = flex
        else:
            mask = flex.causal_mask(length)
            impls["flex"] = Impl(lambda: to_lce_layout(flex(x.q, x.k, x.v, mask)), backend="flex (compiled)")
        return impls, "sdpa"
    variant = variants()[case]
    if case == "nsa":
        params = NSAParameters(variant, args.hidden, args.heads, args.head_dim, 0).to(x.q.dtype)
        layer = NSALayerAttention(variant, params)
        with torch.no_grad():
            chosen = layer.branches(variant, params, x.q, x.k, x.v, x.pos, x.scale).chosen
        block_size = variant.select_block
        impls = {"lce": Impl(lambda: layer(None, x.q, x.k, x.v, None, x.scale, 0.0, q_pos=x.pos, k_pos=x.pos,
                                           hidden_states=x.hidden)[0], backend="ref (nsa_branches)")}
    else:
        layer = SelectedBlocksAttention(variant)
        with torch.no_grad():
            chosen = select_blocks(variant.score, x.q, variant.summaries(x.k, args.heads), x.pos,
                                   variant.block_size, variant.top_k)
        block_size = variant.block_size
        impls = {"lce": Impl(lambda: layer(None, x.q, x.k, x.v, None, x.scale, 0.0, q_pos=x.pos, k_pos=x.pos)[0],
                             backend="ref (SelectedBlocksAttention)")}
    form = pytorch_form(chosen, block_size, length, args.heads)
    impls["lce_op"] = Impl(lambda: to_lce_layout(selected_attention(x.q, x.k, x.v, chosen, block_size, x.scale, x.pos,
                                                                    backend="ref")),
                           backend=f"ref (selected_attention op, selection precomputed: {form} form)",
                           compare=case != "nsa")
    for name, run_form in (("op_masked", selected_attention_masked), ("op_block_major", selected_attention_chunked)):
        impls[name] = Impl(lambda run_form=run_form: to_lce_layout(run_form(x.q, x.k, x.v, chosen, block_size, x.scale,
                                                                            x.pos)),
                           backend=f"{run_form.__name__} (one PyTorch form of the op)", compare=case != "nsa")
    if case == "nsa":
        impls["flex"] = Unavailable("NSA's three gated branches are not one FlexAttention pattern (not run)")
    elif isinstance(flex, Unavailable):
        impls["flex"] = flex
    else:
        mask = flex.selection_mask(chosen, block_size, length, args.heads)
        impls["flex"] = Impl(lambda: to_lce_layout(flex(x.q, x.k, x.v, mask)),
                             backend="flex (compiled, selection table mask_mod)")
    return impls, "lce"


def predicted_seconds(history: list[tuple[int, float]], length: int) -> float | None:
    """One call's time at ``length`` from ``(length, ms)`` measured before: the last two points' growth, else T^2."""
    if not history:
        return None
    (n1, ms1) = history[-1]
    exponent = 2.0
    if len(history) >= 2:
        n0, ms0 = history[-2]
        exponent = max(1.0, min(2.5, torch.tensor(ms1 / ms0).log().item() / torch.tensor(n1 / n0).log().item()))
    return ms1 / 1e3 * (length / n1) ** exponent


def calls(timing: Timing) -> int:
    """Calls one measurement makes: the check, warm-up, timed calls and the memory call (+1 for a reference)."""
    return 1 + timing.warmup + max(1, timing.repeats) + 1


def run(args, on_points=None) -> list[Point]:
    device = torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    flex = Unavailable("skipped (--no-flex)") if args.no_flex else Flex()
    history: dict[tuple[str, str], list[tuple[int, float]]] = {}
    points: list[Point] = []
    for length in args.lengths:
        for case in args.cases:
            x = Inputs(args, length)
            started = time.perf_counter()
            with torch.no_grad(), use_backend("ref"):
                impls, reference = case_impls(case, x, args, flex)
            predicted = {name: predicted_seconds(history.get((case, name), []), length) for name in impls}
            slow = max((p for p in predicted.values() if p is not None), default=0.0)
            timing = Timing(warmup=0, repeats=1) if slow > 5.0 else Timing(warmup=args.warmup, repeats=args.repeats)
            for name, seconds in predicted.items():
                if seconds is not None and seconds * (calls(timing) + (name == reference)) > args.max_seconds:
                    impls[name] = Unavailable(f"skipped: predicted {seconds:.0f} s a call "
                                              f"(> {args.max_seconds:.0f} s for the measurement)")
            if isinstance(impls.get(reference), Unavailable):
                reference = None
            print(f"{case} T={length}: {', '.join(impls)} (reference {reference})", flush=True)
            with use_backend("ref"):
                new = measure(case, "fwd", length, impls, reference, device, timing, tokens=args.batch * length,
                              dtype=dtype)
            for p in new:
                p.extra.setdefault("backend", impls[p.impl].backend if isinstance(impls[p.impl], Impl) else "")
                if p.metric == "ms":
                    history.setdefault((case, p.impl), []).append((length, p.value))
            points += new
            print(f"  {time.perf_counter() - started:.1f} s", flush=True)
            del x, impls
            if on_points is not None:
                on_points(points)
    return points


def ratio_table(points: list[Point]) -> list[dict]:
    """Each implementation's time and peak memory over SDPA causal's at the same length (> 1: slower / more)."""
    ms, mib, status = lookup(points, "ms"), lookup(points, "peak_mib"), lookup(points, "status")
    rows = []
    for (case, mode, impl, length), value in sorted(status.items(), key=lambda kv: (kv[0][3], kv[0][0])):
        base = ms.get(("causal", mode, "sdpa", length))
        base_mib = mib.get(("causal", mode, "sdpa", length))
        key = (case, mode, impl, length)
        row = {"case": case, "impl": impl, "length": length, "status": value, "ms": ms.get(key),
               "peak_mib": mib.get(key), "time_vs_sdpa": None, "mem_vs_sdpa": None}
        if key in ms and base:
            row["time_vs_sdpa"] = ms[key] / base
        if key in mib and base_mib:
            row["mem_vs_sdpa"] = mib[key] / base_mib
        rows.append(row)
    return rows


def write_ratios(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["case"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot(points: list[Point], path: Path, title: str) -> Path:
    """Time vs length (log-log), one panel per case, SDPA causal drawn in every panel as the yardstick. (Not
    ``harness.plot``: its styles come from ``lce.eval.report``, which imports transformers, 10 s on a busy CPU.)"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = lookup(points, "ms")
    cases = list(dict.fromkeys(case for case, _, _, _ in ms))
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.6), squeeze=False)
    sdpa = sorted((n, v) for (c, _, i, n), v in ms.items() if (c, i) == ("causal", "sdpa"))
    for ax, case in zip(axes.flat, cases):
        impls = dict.fromkeys(i for c, _, i, _ in ms if c == case)
        for impl in impls:
            xs = sorted(n for c, _, i, n in ms if (c, i) == (case, impl))
            ax.plot(xs, [ms[(case, "fwd", impl, x)] for x in xs], marker="o", label=impl)
        if case != "causal" and sdpa:
            ax.plot([n for n, _ in sdpa], [v for _, v in sdpa], "k--", label="sdpa causal")
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(rows: list[dict]) -> None:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    print(f"{'length':>7} {'case':<12} {'impl':<14} {'ms':>10} {'x sdpa':>7} {'MiB':>8}  status")
    for r in rows:
        print(f"{r['length']:>7} {r['case']:<12} {r['impl']:<14} {fmt(r['ms'], '10.1f')} "
              f"{fmt(r['time_vs_sdpa'], '7.2f')} {fmt(r['peak_mib'], '8.1f')}  {str(r['status'])[:70]}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384, 32768])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=576, help="hidden size feeding NSA's gates (SmolLM2-135M: 576)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (0 where a call takes > 5 s)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls, median (1 where a call takes > 5 s)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="skip a (case, impl) predicted to take longer")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compiles once per length and case)")
    p.add_argument("--out", type=Path, default=Path("outputs/benchmarks/sparse_cpu"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    env = environment(torch.device("cpu"))
    env.update(dtype=args.dtype, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    csv_path = args.out / CSV_NAME
    points = run(args, on_points=lambda pts: write_csv(pts, env, csv_path))
    print(f"wrote {write_csv(points, env, csv_path)}")
    rows = ratio_table(points)
    print(f"wrote {write_ratios(rows, args.out / 'ratios.csv')}")
    if any(p.metric == "ms" for p in points):
        title = f"{env['device']} {args.dtype}, forward"
        print(f"wrote {plot(points, args.out / 'sparse_cpu.png', title)}")
    print_table(rows)
    failed = [r for r in rows if r["impl"].startswith("lce") and not str(r["status"]).startswith(("ok", "unavailable"))]
    for r in failed:
        print(f"FAILED: {r['case']} T={r['length']} {r['impl']}: {r['status']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
