"""Benchmark of lce's other kernels (issues #5, #14) against their peers, forward and forward+backward, measured side by
side in one run (``harness.measure``: outputs and gradients checked at every size, then timed):

- ``rope``: lce's fused q+k RoPE (``lce.kernels.rope.apply_rope``) vs transformers' ``apply_rotary_pos_emb`` with
  the model's precomputed cos/sin (the reference) and a plain copy of q and k (``copy``, the memory-bandwidth
  yardstick: it moves the same bytes). ``gb_per_s`` counts the bytes of q and k read and written (x2 with the
  backward: the gradients are read and written too); the target is >= 75% of the GPU's HBM bandwidth.
- ``linear``: causal linear attention, normalised (``num / den``, no decay; ``lce.kernels.linear_attention``) vs
  flash-linear-attention's ``chunk_linear_attn(normalize=True)`` (fla, its own ``[B, T, H, D]`` layout) and SDPA
  flash softmax attention of the same shape (a yardstick, not compared). Reference: lce's chunked PyTorch form.
- ``loss``: mean next-token cross-entropy from hidden states and the output layer: lce's fused kernel
  (``lce.kernels.cross_entropy.linear_cross_entropy``, no logits in memory) vs Liger's fused linear cross-entropy
  and full logits + ``F.cross_entropy`` (the reference). ``peak_mib`` shows what each holds: full logits ``N x V``.

FLOPs: loss ``2 N V C`` forward, ``6 N V C`` forward+backward; linear attention counts its chunked form
(``4 T C D + 4 T D^2`` per head forward, x3 with the backward). Lengths are tokens (``B = 1``). Output:
``kernels.csv`` (long format), ``kernels.png``, tables and ratios printed.

    python experiments/benchmarks/ops.py --dtype bfloat16 --heads 32 --kv-heads 8 --head-dim 128 --hidden 4096 \\
        --vocab 128256 --lengths 65536 --out OUT_DIR
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

from lce.kernels.cross_entropy import LogitHead, linear_cross_entropy
from lce.kernels.linear_attention import linear_attention
from lce.kernels.rope import apply_rope

CASES = ("rope", "linear", "loss")
REFERENCES = {"rope": "hf_apply_rotary", "linear": "lce_ref", "loss": "full_logits"}


def leaves(tensors, grad: bool) -> list[torch.Tensor]:
    return [t.requires_grad_(grad) for t in tensors]


def triton_or_reason(args, device: torch.device, make) -> Impl | Unavailable:
    if native_triton(device, args.interpreted_triton):
        return make()
    return Unavailable("Triton kernels run on CUDA (or --interpreted-triton)")


def rope_impls(args, length: int, device, dtype, mode: str) -> dict[str, Impl | Unavailable]:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(length)
    grad = mode == "fwd+bwd"
    q, k = leaves((torch.randn(1, h, length, args.head_dim, generator=gen).to(device, dtype)
                   for h in (args.heads, args.kv_heads)), grad)
    positions = torch.arange(length, device=device)
    inv_freq = (1.0 / 10000 ** (torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim)).to(device)
    angles = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype)[None], emb.sin().to(dtype)[None]  # precomputed, as the model's rotary module does
    inputs = {"q": q, "k": k}
    impls: dict[str, Impl | Unavailable] = {
        "hf_apply_rotary": Impl(lambda: apply_rotary_pos_emb(q, k, cos, sin), inputs, "transformers (eager)"),
        "copy": Impl(lambda: (q.clone(), k.clone()), inputs, "torch clone", compare=False),
    }
    if args.pytorch_paths:
        impls["lce_ref"] = Impl(lambda: apply_rope(q, k, positions, inv_freq, backend="ref"), inputs, "lce PyTorch")
    impls["lce_triton"] = triton_or_reason(args, device, lambda: Impl(
        lambda: apply_rope(q, k, positions, inv_freq, backend="triton"), inputs, "triton"))
    return impls


def rope_bytes(args, length: int, dtype: torch.dtype, mode: str) -> int:
    """Bytes a fused RoPE must move: read q and k, write them back; the backward does the same with the gradients."""
    elements = (args.heads + args.kv_heads) * length * args.head_dim
    return 2 * elements * torch.finfo(dtype).bits // 8 * (2 if mode == "fwd+bwd" else 1)


def fla_linear_attention():
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as error:  # noqa: BLE001 - ImportError, or an fla that does not import with this torch/Triton
        return Unavailable(f"flash-linear-attention not importable ({type(error).__name__}: {error})")
    return chunk_linear_attn


def linear_impls(args, length: int, device, dtype, mode: str) -> dict[str, Impl | Unavailable]:
    gen = torch.Generator().manual_seed(length)
    grad = mode == "fwd+bwd"
    shape = (1, args.heads, length, args.head_dim)
    raw = [F.elu(torch.randn(shape, generator=gen)).add(1) for _ in range(2)] + [torch.randn(shape, generator=gen)]
    fq, fk, v = leaves((t.to(device, dtype) for t in raw), grad)
    inputs = {"q": fq, "k": fk, "v": v}

    def normalised(backend):
        num, den, _ = linear_attention(fq, fk, v, backend=backend)
        return num / den[..., None]

    impls: dict[str, Impl | Unavailable] = {"lce_ref": Impl(lambda: normalised("ref"), inputs, "lce PyTorch")}
    chunk_linear_attn = fla_linear_attention()
    if isinstance(chunk_linear_attn, Unavailable) or device.type != "cuda":
        impls["fla_chunk"] = (chunk_linear_attn if isinstance(chunk_linear_attn, Unavailable)
                              else Unavailable("fla's Triton kernels run on CUDA"))
    else:
        # fla's own layout [B, T, H, D]: the same values, contiguous, as separate leaves.
        tq, tk, tv = leaves((t.detach().transpose(1, 2).contiguous() for t in (fq, fk, v)), grad)
        impls["fla_chunk"] = Impl(
            lambda: chunk_linear_attn(tq, tk, tv, scale=1.0, normalize=True)[0].transpose(1, 2),
            {"q": tq, "k": tk, "v": tv}, "fla chunk_linear_attn", to_reference=lambda t: t.transpose(1, 2)
            if t.dim() == 4 and t.shape[1] == length else t)
    impls["sdpa_flash_softmax"] = Impl(lambda: F.scaled_dot_product_attention(fq, fk, v, is_causal=True), inputs,
                                       "sdpa (softmax attention: the yardstick)", compare=False)
    impls["lce_triton"] = triton_or_reason(args, device, lambda: Impl(lambda: normalised("triton"), inputs,
                                                                      "triton"))
    return impls


def linear_flops(args, length: int, mode: str) -> float:
    chunk, d = 64, args.head_dim
    forward = args.heads * (4 * length * chunk * d + 4 * length * d * d)
    return forward * (3 if mode == "fwd+bwd" else 1)


def liger_loss():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as error:  # noqa: BLE001 - liger's transformers integration may not import with this one
        print(f"liger_kernel.transformers.functional: {type(error).__name__}: {error}; using liger_kernel.ops")
    else:
        return liger_fused_linear_cross_entropy
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except Exception as error:  # noqa: BLE001
        return Unavailable(f"liger-kernel not importable ({type(error).__name__}: {error})")
    return lambda hidden, weight, targets: LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets)[0]


def loss_impls(args, length: int, device, dtype, mode: str) -> dict[str, Impl | Unavailable]:
    gen = torch.Generator().manual_seed(length)
    grad = mode == "fwd+bwd"
    hidden = torch.randn(length, args.hidden, generator=gen).to(device, dtype)
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) / args.hidden**0.5).to(device, dtype)
    hidden, weight = leaves((hidden, weight), grad)
    targets = torch.randint(0, args.vocab, (length,), generator=gen).to(device)
    inputs = {"hidden": hidden, "weight": weight}
    head = LogitHead(weight)
    impls: dict[str, Impl | Unavailable] = {
        "full_logits": Impl(lambda: F.cross_entropy((hidden @ weight.T).float(), targets), inputs,
                            "matmul + F.cross_entropy (fp32 logits)"),
    }
    liger = liger_loss()
    if isinstance(liger, Unavailable) or device.type != "cuda":
        impls["liger_flce"] = liger if isinstance(liger, Unavailable) else Unavailable("Liger runs on CUDA")
    else:
        impls["liger_flce"] = Impl(lambda: liger(hidden, weight, targets), inputs, "liger fused linear CE")
    if args.pytorch_paths:
        impls["lce_ref"] = Impl(lambda: linear_cross_entropy(hidden, head, targets, backend="ref",
                                                             chunk_size=args.loss_chunk).mean(), inputs,
                                "lce PyTorch (chunked)")
    impls["lce_triton"] = triton_or_reason(args, device, lambda: Impl(
        lambda: linear_cross_entropy(hidden, head, targets, backend="triton").mean(), inputs, "triton"))
    return impls


def loss_flops(args, length: int, mode: str) -> float:
    return 2 * length * args.vocab * args.hidden * (3 if mode == "fwd+bwd" else 1)


BUILDERS = {"rope": rope_impls, "linear": linear_impls, "loss": loss_impls}


def run(args, on_points=None) -> list[Point]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    points: list[Point] = []
    for mode in args.modes:
        for case in args.cases:
            lengths = {"rope": args.lengths, "linear": args.linear_lengths, "loss": args.loss_lengths}[case]
            for length in lengths or args.lengths:
                impls = BUILDERS[case](args, length, device, dtype, mode)
                reference = REFERENCES[case] if isinstance(impls.get(REFERENCES[case]), Impl) else None
                print(f"{case} {mode} T={length}: {', '.join(impls)} (reference {reference})", flush=True)
                rates = {"rope": {"bytes_moved": rope_bytes(args, length, dtype, mode)},
                         "linear": {"flops": linear_flops(args, length, mode)},
                         "loss": {"flops": loss_flops(args, length, mode)}}[case]
                points += measure(case, mode, length, impls, reference, device, timing(args), tokens=length,
                                  dtype=dtype, **rates)
                del impls
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if on_points is not None:
                    on_points(points)
    return points


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096], help="lengths of rope (and the default)")
    p.add_argument("--linear-lengths", nargs="+", type=int, default=None, help="lengths of linear")
    p.add_argument("--loss-lengths", nargs="+", type=int, default=None, help="tokens of loss")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512, help="hidden size of the loss case")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary of the loss case")
    p.add_argument("--loss-chunk", type=int, default=1024, help="rows of logits lce's PyTorch loss holds at once")
    p.add_argument("--pytorch-paths", action="store_true", help="also time lce's PyTorch paths of rope and loss")
    add_common_arguments(p, "outputs/benchmarks/kernels")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    env = environment(torch.device(args.device))
    env.update(dtype=args.dtype, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
               hidden=args.hidden, vocab=args.vocab)
    points = run(args, on_points=lambda pts: write_csv(pts, env, args.out / "kernels.csv"))
    return report(points, env, args.out, "kernels", f"{env['device']} {args.dtype}")


if __name__ == "__main__":
    sys.exit(main())
