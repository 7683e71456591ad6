"""Benchmark of lce's other kernels (issue #5) against their peers, measured in one run:

- ``rope``: lce's RoPE (``lce.kernels.rope.apply_rope``: reference, and the fused q+k Triton launch on CUDA) vs
  transformers' ``apply_rotary_pos_emb`` with the model's precomputed cos/sin. On CUDA the Triton row also reports the
  achieved memory bandwidth (bytes read + written / time) in ``extra``.
- ``linear``: chunked causal linear attention (``lce.kernels.linear_attention``: reference chunked form, Triton on
  CUDA) vs SDPA causal softmax attention of the same shape (the issue's target: >= 2x SDPA at 16k).
- ``loss``: per-token NLL from hidden states and the output layer: lce's chunked reference and fused Triton kernel
  (``lce.kernels.cross_entropy``) vs full logits + ``F.cross_entropy``. The interesting column is peak memory: the
  full-logits peer holds ``N x V`` fp32 logits, lce one chunk (reference) or none (Triton).

Lengths are tokens (``B = 1``). Output: ``kernels.csv`` (long format), ``kernels.png``, ratios printed.

    python experiments/benchmarks/ops.py --lengths 1024 4096 16384 --out experiments/results/kernels/cpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Impl, Point, add_common_arguments, check, environment, measure, report

from lce.kernels.cross_entropy import LogitHead, linear_cross_entropy
from lce.kernels.linear_attention import linear_attention
from lce.kernels.rope import apply_rope

CASES = ("rope", "linear", "loss")


def native_triton(args, device: torch.device) -> bool:
    """Triton rows run where the kernels are compiled (CUDA), or in the interpreter when asked to."""
    from lce.kernels.backend import interpreting

    return device.type == "cuda" or (args.interpreted_triton and interpreting())


def rope_impls(args, length: int, device: torch.device, dtype: torch.dtype, points: list[Point]) -> dict[str, Impl]:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(length)
    q = torch.randn(1, args.heads, length, args.head_dim, generator=gen).to(device, dtype)
    k = torch.randn(1, args.kv_heads, length, args.head_dim, generator=gen).to(device, dtype)
    positions = torch.arange(length, device=device)
    inv_freq = (1.0 / 10000 ** (torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim)).to(device)
    angles = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype)[None], emb.sin().to(dtype)[None]  # precomputed, as the model's rotary module does
    impls = {
        "lce_ref": lambda: torch.cat(apply_rope(q, k, positions, inv_freq, backend="ref"), dim=1),
        "hf_apply_rotary": lambda: torch.cat(apply_rotary_pos_emb(q, k, cos, sin), dim=1),
    }
    if native_triton(args, device):
        impls["lce_triton"] = lambda: torch.cat(apply_rope(q, k, positions, inv_freq, backend="triton"), dim=1)
    return impls


def rope_bytes(args, length: int, dtype: torch.dtype) -> int:
    """Bytes a fused RoPE must move: read q and k, write them back (positions and frequencies are negligible)."""
    elements = (args.heads + args.kv_heads) * length * args.head_dim
    return 2 * elements * torch.finfo(dtype).bits // 8


def linear_impls(args, length: int, device: torch.device, dtype: torch.dtype, points) -> dict[str, Impl]:
    gen = torch.Generator().manual_seed(length)
    shape = (1, args.heads, length, args.head_dim)
    fq, fk = (F.elu(torch.randn(shape, generator=gen)).add(1).to(device, dtype) for _ in range(2))
    v = torch.randn(shape, generator=gen).to(device, dtype)

    def normalised(backend):
        num, den, _ = linear_attention(fq, fk, v, backend=backend)
        return num / den[..., None]

    impls = {"lce_ref": lambda: normalised("ref"),
             "sdpa_softmax": lambda: F.scaled_dot_product_attention(fq, fk, v, is_causal=True)}
    if native_triton(args, device):
        impls["lce_triton"] = lambda: normalised("triton")
    return impls


def loss_impls(args, length: int, device: torch.device, dtype: torch.dtype, points) -> dict[str, Impl]:
    gen = torch.Generator().manual_seed(length)
    hidden = torch.randn(length, args.hidden, generator=gen).to(device, dtype)
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) / args.hidden**0.5).to(device, dtype)
    targets = torch.randint(0, args.vocab, (length,), generator=gen).to(device)
    head = LogitHead(weight)
    impls = {
        "lce_ref": lambda: linear_cross_entropy(hidden, head, targets, backend="ref", chunk_size=args.loss_chunk),
        "full_logits": lambda: F.cross_entropy((hidden @ weight.T).float(), targets, reduction="none"),
    }
    if native_triton(args, device):
        impls["lce_triton"] = lambda: linear_cross_entropy(hidden, head, targets, backend="triton")
    return impls


BUILDERS = {"rope": rope_impls, "linear": linear_impls, "loss": loss_impls}


def run(args) -> list[Point]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    points: list[Point] = []
    with torch.inference_mode():
        for case in args.cases:
            lengths = args.lengths if case != "linear" else args.linear_lengths or args.lengths
            points += check(case, args.check_length, BUILDERS[case](args, args.check_length, device, dtype, points),
                            unlike=("sdpa_softmax",))  # softmax attention: the speed yardstick, not the same op
            for length in lengths:
                impls = BUILDERS[case](args, length, device, dtype, points)
                print(f"{case} T={length}: {', '.join(impls)}", flush=True)
                measured = measure(case, length, impls, device, tokens=length, warmup=args.warmup,
                                   repeats=args.repeats)
                if case == "rope":
                    for p in measured:
                        if p.metric == "ms":
                            p.extra["gb_per_s"] = rope_bytes(args, length, dtype) / (p.value / 1e3) / 1e9
                points += measured
    return points


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384])
    p.add_argument("--linear-lengths", nargs="+", type=int, default=None, help="lengths of the linear case only")
    p.add_argument("--check-length", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512, help="hidden size of the loss case")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary of the loss case")
    p.add_argument("--loss-chunk", type=int, default=1024, help="rows of logits the reference holds at once")
    add_common_arguments(p, "outputs/benchmarks/kernels")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    points = run(args)
    env = environment(torch.device(args.device))
    env.update(dtype=args.dtype, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
               hidden=args.hidden, vocab=args.vocab)
    report(points, env, args.out, "kernels", f"{env['device']} {args.dtype} fwd")


if __name__ == "__main__":
    main()
