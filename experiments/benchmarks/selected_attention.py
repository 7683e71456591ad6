"""Selected-block attention benchmark: lce's Triton forwards (``lce.kernels.selected_attention``, backend
``triton``) against lce's PyTorch forms (backend ``ref``, the reference where it runs) and FlashAttention-2 full
causal attention (SDPA pinned to its flash kernel: the yardstick a sparse selection has to beat, not compared),
forward and forward+backward, measured side by side (``harness.measure``: outputs and gradients checked, then timed).

Cases (``[B, H, T, D]`` inputs, GQA with ``HQ / HKV`` query heads per KV head):

- ``nsa_shared``: NSA's selected branch: ``--slots`` blocks (default 16) of ``--block-size`` keys (64) per query,
  one selection shared by the query heads of each GQA group (``block_index [B, HKV, T, N]``), so the per-token
  kernel loads each block once per group.
- ``moba_per_head``: MoBA: a selection per query head (``[B, HQ, T, N]``) of ``1 / --fraction`` (default 1/8) of the
  blocks of ``--moba-block-size`` keys (512, MoBA's). The per-token kernel's tile would hold one useful row (padded
  to 16) and it takes blocks up to 128 keys; the key-block-major forward fills its tiles with the queries that chose
  a block.

Implementations: ``lce_triton`` is the op as it dispatches (``function.triton_form`` picks the forward by design;
the label says which); ``triton_per_token`` and ``triton_block_major`` force each forward (the backward is the same
kernels), so one run measures which is faster; ``triton_per_token`` runs moba_per_head only up to
``--per-token-max``. Every selection holds the query's own block plus distinct random earlier blocks (``-1`` where
fewer exist), as top-k gates produce. FLOPs count ``4 B HQ D`` per visible (query, key) pair (x3.5 for
forward+backward, as ``attention.py``); FlashAttention's row counts its causal pairs, so TFLOP/s compare work done,
and the ratios printed compare time. The PyTorch forms run at ``--ref-lengths`` only; elsewhere the Triton rows are
timed unchecked. Output: ``selected_attention.csv`` (long format, rewritten after every point) and ``.png``, tables
and ratios printed; exit code 1 when a row of lce's errs or mismatches. Without CUDA (and without
``--interpreted-triton`` on CPU) it says so and exits 0.

    python experiments/benchmarks/selected_attention.py --dtype bfloat16 --heads 32 --kv-heads 2 --head-dim 128 \\
        --lengths 8192 16384 32768 65536 --out OUT_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    Impl,
    Point,
    Unavailable,
    add_common_arguments,
    environment,
    measure,
    native_triton,
    report,
    timing,
    write_csv,
)

from lce.kernels.selected_attention import selected_attention
from lce.kernels.selected_attention.function import triton_form

CASES = ("nsa_shared", "moba_per_head")


def selection(batch: int, heads: int, length: int, block_size: int, slots: int, device: torch.device,
              seed: int) -> torch.Tensor:
    """``[B, heads, T, slots]`` int32: each query's own block and ``slots - 1`` distinct random earlier ones (``-1``
    where fewer exist). Built ``rows`` queries at a time (random scores over the blocks, top-k) to bound memory."""
    blocks = -(-length // block_size)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(batch, heads, length, slots, dtype=torch.int32, device=device)
    rows = max(1, (1 << 27) // (batch * heads * blocks))
    for start in range(0, length, rows):
        t = torch.arange(start, min(start + rows, length), device=device)
        own = (t // block_size)[:, None]
        scores = torch.rand(batch, heads, len(t), blocks, generator=gen, device=device)
        block = torch.arange(blocks, device=device)[None]
        scores = scores.masked_fill(block > own, float("-inf")).masked_fill(block == own, 2.0)
        top, index = scores.topk(min(slots, blocks), dim=-1)
        index = torch.where(top == float("-inf"), -1, index)
        if slots > blocks:
            index = F.pad(index, (0, slots - blocks), value=-1)
        out[:, :, start:start + len(t)] = index.to(torch.int32)
    return out


def visible_pairs(index: torch.Tensor, block_size: int, length: int, query_heads: int) -> int:
    """(query head, key) pairs summed over the queries: what the FLOPs count."""
    start = index.long() * block_size
    pos = torch.arange(length, device=index.device)[None, None, :, None]
    keys = (torch.minimum(start + block_size, pos + 1) - start).clamp(min=0) * (index >= 0)
    return int(keys.sum().item()) * (query_heads // index.shape[1])


def sdpa_flash(q, k, v) -> torch.Tensor:
    """SDPA pinned to its flash kernel (FlashAttention-2), full causal attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def impls_of(case: str, args, length: int, device: torch.device, dtype: torch.dtype, mode: str):
    """``(impls, visible pairs)`` of one case at one length."""
    gen = torch.Generator().manual_seed(length)
    grad = mode == "fwd+bwd"
    q, k, v = (torch.randn(args.batch, h, length, args.head_dim, generator=gen).to(device, dtype).requires_grad_(grad)
               for h in (args.heads, args.kv_heads, args.kv_heads))
    block_size = args.block_size if case == "nsa_shared" else args.moba_block_size
    blocks = -(-length // block_size)
    if case == "nsa_shared":
        heads, slots = args.kv_heads, min(args.slots, blocks)
    else:
        heads, slots = args.heads, max(1, blocks // args.fraction)
    index = selection(args.batch, heads, length, block_size, slots, device, seed=length)
    scale = args.head_dim ** -0.5
    inputs = {"q": q, "k": k, "v": v}

    def op(backend):
        return lambda: selected_attention(q, k, v, index, block_size, scale, backend=backend)

    triton = native_triton(device, args.interpreted_triton)
    impls: dict[str, Impl | Unavailable] = {}
    impls["lce_ref"] = (Impl(op("ref"), inputs, "lce PyTorch (pytorch_form)") if length in args.ref_lengths
                        else Unavailable(f"the PyTorch forms run at --ref-lengths {args.ref_lengths} only"))
    impls["lce_triton"] = (Impl(op("triton"), inputs, f"triton ({triton_form(index, block_size, args.heads)})")
                           if triton else Unavailable("Triton kernels run on CUDA (or --interpreted-triton)"))
    # both Triton forwards forced, whichever triton_form picks (it picks by design, these rows are the measurement)
    from lce.kernels.selected_attention.triton_block_major import selected_attention_block_major
    from lce.kernels.selected_attention.triton_selected import BLOCK_SIZES, selected_attention_triton

    for name, run, why_not in (
            ("triton_per_token", selected_attention_triton,
             "blocks over 128 keys" if block_size > max(BLOCK_SIZES) else
             f"above --per-token-max {args.per_token_max}" if heads == args.heads and length > args.per_token_max
             else None),
            ("triton_block_major", selected_attention_block_major, None)):
        if not triton or why_not:
            impls[name] = Unavailable(why_not or "Triton kernels run on CUDA (or --interpreted-triton)")
        else:
            impls[name] = Impl(lambda run=run: run(q, k, v, index, block_size, scale), inputs, name)
    impls["sdpa_flash_causal"] = (Impl(lambda: sdpa_flash(q, k, v), inputs, "sdpa:FLASH_ATTENTION (full causal)",
                                       compare=False) if device.type == "cuda"
                                  else Unavailable("SDPA's flash kernel runs on CUDA"))
    return impls, visible_pairs(index, block_size, length, args.heads), slots


def run(args, on_points=None) -> list[Point]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    points: list[Point] = []
    for mode in args.modes:  # then case, then length: a run cut short keeps the forward of every case
        for case in args.cases:
            for length in args.lengths if case == "nsa_shared" else args.per_head_lengths or args.lengths:
                impls, pairs, slots = impls_of(case, args, length, device, dtype, mode)
                reference = "lce_ref" if isinstance(impls["lce_ref"], Impl) else None
                print(f"{case} {mode} T={length} N={slots}: {', '.join(impls)} (reference {reference})", flush=True)
                flops = 4 * args.batch * args.head_dim * pairs * (3.5 if mode == "fwd+bwd" else 1.0)
                points += measure(case, mode, length, impls, reference, device, timing(args), flops=flops,
                                  tokens=args.batch * length, dtype=dtype)
                del impls
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if on_points is not None:
                    on_points(points)
    return points


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--lengths", nargs="+", type=int, default=[8192, 16384, 32768, 65536])
    p.add_argument("--per-head-lengths", nargs="+", type=int, default=[8192, 16384, 32768, 65536],
                   help="lengths of moba_per_head")
    p.add_argument("--per-token-max", type=int, default=16384,
                   help="longest moba_per_head length the per-token forward is timed at (one useful row per tile: "
                        "it reads T/8 keys per query head, T^2 / 8 reads)")
    p.add_argument("--ref-lengths", nargs="+", type=int, default=[8192],
                   help="lengths where the PyTorch forms run (the reference)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64, help="keys per block of nsa_shared (NSA: 64)")
    p.add_argument("--moba-block-size", type=int, default=512, help="keys per block of moba_per_head (MoBA: 512)")
    p.add_argument("--slots", type=int, default=16, help="selected blocks per query of nsa_shared")
    p.add_argument("--fraction", type=int, default=8, help="moba_per_head selects 1/fraction of the blocks")
    add_common_arguments(p, "outputs/benchmarks/selected_attention")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and not native_triton(device, args.interpreted_triton):
        print(f"selected_attention benchmark: no CUDA device here (device {args.device}); it times Triton kernels on "
              "a GPU (--device cpu --interpreted-triton with TRITON_INTERPRET=1 runs toy sizes). Nothing measured.")
        return 0
    env = environment(device)
    env.update(dtype=args.dtype, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
               block_size=args.block_size, moba_block_size=args.moba_block_size)
    csv_path = args.out / "selected_attention.csv"
    points = run(args, on_points=lambda pts: write_csv(pts, env, csv_path))  # a killed run keeps what it measured
    return report(points, env, args.out, "selected_attention", f"{env['device']} {args.dtype}")


if __name__ == "__main__":
    sys.exit(main())
