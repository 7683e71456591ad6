"""Attention benchmark (issue #5): lce's attention paths against the peers the issue names, measured in one run.

Cases and implementations (``[B, H, T, D]`` inputs, GQA with ``H / HKV`` query heads per KV head):

- ``causal``: SDPA (``is_causal``), compiled FlexAttention (causal ``BlockMask``), lce's Triton kernel, and the
  flash-attn package (``flash_attn_func``, also with ``alibi_slopes`` and ``window_size`` in the next cases) when it
  is installed and the inputs are fp16/bf16 on CUDA.
- ``alibi``: lce's PyTorch path (``lce.posenc.alibi.alibi_attention``, block-wise), SDPA with a materialised
  ``[1, H, T, T]`` bias (built per call, as a model without lce would), FlexAttention (``score_mod``), Triton.
- ``logn``: lce's PyTorch path (queries scaled, then SDPA), FlexAttention (``score_mod`` scaling each row), Triton.
- ``window``: lce's PyTorch path (``blockwise_attention`` + ``SlidingWindowPattern``), SDPA with a materialised boolean
  mask, FlexAttention (sliding-window ``BlockMask``), Triton.
- ``dca``: lce's PyTorch path (``dca_attention``: one softmax over the three segments), the ChunkLlama-style three
  calls per chunk with a log-sum-exp merge (``chunkllama_attn_replace.py``; SDPA's flash kernel with its LSE stands in
  for ``flash_attn_func``), Triton.

Triton rows appear when the kernels run natively (CUDA); under ``TRITON_INTERPRET=1`` on CPU they are skipped unless
``--interpreted-triton`` is given (interpreter timings mean nothing). Every implementation is first checked against
the case's first implementation at ``--check-length`` (``max_abs_err`` rows). Results: long-format CSV
(``attention.csv``), ``attention.png``, and ratio lines printed per case.

    python experiments/benchmarks/attention.py --lengths 1024 2048 4096 8192 --out experiments/results/kernels/cpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Impl, Point, add_common_arguments, check, environment, measure, report

from lce.attention.sliding_window import SlidingWindowPattern
from lce.core.blockwise import blockwise_attention
from lce.kernels.rope import Rotation
from lce.posenc.alibi import alibi_attention, alibi_slopes
from lce.posenc.dca import DcaGeometry, dca_attention
from lce.posenc.logn import logn_scale

CASES = ("causal", "alibi", "logn", "window", "dca")


class Inputs:
    """Random q/k/v (unrotated: the RoPE cases rotate them themselves) and their positions for one length."""

    def __init__(self, args, length: int, device: torch.device, grad: bool):
        gen = torch.Generator(device="cpu").manual_seed(length)
        dtype = getattr(torch, args.dtype)
        shape_q, shape_kv = (args.batch, args.heads, length, args.head_dim), (args.batch, args.kv_heads, length,
                                                                              args.head_dim)
        self.q, self.k, self.v = (torch.randn(s, generator=gen).to(device, dtype).requires_grad_(grad)
                                  for s in (shape_q, shape_kv, shape_kv))
        self.pos = torch.arange(length, device=device)[None].expand(args.batch, length)
        self.scale = args.head_dim ** -0.5
        self.length, self.device = length, device
        self.rotation = Rotation(
            1.0 / 10000 ** (torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim))

    def rotated(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotation.apply(self.q, self.pos), self.rotation.apply(self.k, self.pos)


def sdpa(q, k, v, **kwargs) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kwargs)


def transposed(out: torch.Tensor) -> torch.Tensor:
    """lce kernels return ``[B, T, H, D]``; the peers ``[B, H, T, D]``."""
    return out.transpose(1, 2)


def flex_factory(device: torch.device):
    """Compiled FlexAttention and its mask builder, or None when this torch cannot compile it."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    # One compiled graph per (case, length, score_mod): far more than dynamo's default limit of 8 recompilations,
    # past which flex_attention silently falls back to its unfused eager form.
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    compiled = torch.compile(flex_attention, dynamic=False)

    def block_mask(mask_mod, length):
        return create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length, device=str(device))

    return compiled, block_mask


def flash_attn_func():
    """The flash-attn package's ``flash_attn_func`` (CUDA only), or None when it is not installed."""
    try:
        from flash_attn import flash_attn_func as func
    except ImportError:
        return None
    return func


def flash_attn_impl(q, k, v, **kwargs) -> Impl | None:
    """flash-attn on ``[B, H, T, D]`` inputs (it takes ``[B, T, H, D]``), for fp16/bf16 CUDA tensors."""
    func = flash_attn_func()
    if func is None or not q.is_cuda or q.dtype == torch.float32:
        return None
    return lambda: func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, **kwargs).transpose(1, 2)


def causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def peer_impls(case: str, x: Inputs, args, flex) -> dict[str, Impl]:
    """The PyTorch implementations of ``case`` (lce's first: it is the reference of the error check)."""
    q, k, v, pos, scale, length = x.q, x.k, x.v, x.pos, x.scale, x.length
    heads, gqa = q.shape[1], q.shape[1] != k.shape[1]
    impls: dict[str, Impl] = {}
    if case == "causal":
        qr, kr = x.rotated()
        impls["sdpa"] = lambda: sdpa(qr, kr, v, is_causal=True)
        if (fa := flash_attn_impl(qr, kr, v)) is not None:
            impls["flash_attn"] = fa
        if flex:
            compiled, block_mask = flex
            mask = block_mask(causal_mod, length)
            impls["flex"] = lambda: compiled(qr, kr, v, block_mask=mask, enable_gqa=gqa)
    elif case == "alibi":
        slopes = alibi_slopes(heads).to(q.device)
        impls["lce_ref"] = lambda: transposed(alibi_attention(q, k, v, slopes, pos, pos, scale))

        def sdpa_bias():
            distance = (pos[0, :, None] - pos[0, None, :]).to(torch.float32)
            bias = (-slopes[:, None, None] * distance).masked_fill(distance < 0, float("-inf"))
            return sdpa(q, k, v, attn_mask=bias[None].to(q.dtype))

        impls["sdpa_bias"] = sdpa_bias
        if (fa := flash_attn_impl(q, k, v, alibi_slopes=slopes.float())) is not None:
            impls["flash_attn"] = fa  # flash-attn's ALiBi: -m_h |i - j|, equal to lce's on causal pairs
        if flex:
            compiled, block_mask = flex
            mask = block_mask(causal_mod, length)

            def alibi_mod(score, b, h, q_idx, kv_idx):
                return score - slopes[h] * (q_idx - kv_idx)

            impls["flex"] = lambda: compiled(q, k, v, score_mod=alibi_mod, block_mask=mask, enable_gqa=gqa)
    elif case == "logn":
        qr, kr = x.rotated()
        factor = logn_scale(args.train_length)(pos[0])  # [T]

        impls["lce_ref"] = lambda: sdpa(qr * factor[None, None, :, None].to(q.dtype), kr, v, is_causal=True)
        if flex:
            compiled, block_mask = flex
            mask = block_mask(causal_mod, length)

            def logn_mod(score, b, h, q_idx, kv_idx):
                return score * factor[q_idx]

            impls["flex"] = lambda: compiled(qr, kr, v, score_mod=logn_mod, block_mask=mask, enable_gqa=gqa)
    elif case == "window":
        qr, kr = x.rotated()
        window = args.window
        pattern = SlidingWindowPattern(window)
        impls["lce_ref"] = lambda: transposed(blockwise_attention(qr, kr, v, pos, pos, scale, visible=pattern,
                                                                  block_size=pattern.query_block))

        def sdpa_mask():
            i, j = pos[0, :, None], pos[0, None, :]
            return sdpa(qr, kr, v, attn_mask=(j <= i) & (i - j < window))

        impls["sdpa_mask"] = sdpa_mask
        if (fa := flash_attn_impl(qr, kr, v, window_size=(window - 1, 0))) is not None:
            impls["flash_attn"] = fa  # keys i - (window - 1) .. i
        if flex:
            compiled, block_mask = flex

            def window_mod(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

            mask = block_mask(window_mod, length)
            impls["flex"] = lambda: compiled(qr, kr, v, block_mask=mask, enable_gqa=gqa)
    elif case == "dca":
        geometry = dca_geometry(args)
        impls["lce_ref"] = lambda: transposed(dca_attention(q, k, v, geometry, x.rotation, pos, pos, scale,
                                                            mscale=False))
        impls["chunkllama_3call"] = lambda: chunkllama_dca(q, k, v, geometry, x.rotation, scale)
    return impls


def dca_geometry(args) -> DcaGeometry:
    c = args.train_length
    return DcaGeometry(c, c * 3 // 4, c // 8, "code")


def _attention_lse(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention call returning ``(out [B, H, Tq, D], lse [B, H, Tq])``, as ``flash_attn_func`` does."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    return out, lse


def chunkllama_dca(q, k, v, geometry: DcaGeometry, rotation: Rotation, scale: float) -> torch.Tensor:
    """ChunkLlama's DCA: per query chunk, intra (causal), successive and inter calls merged with detached LSE weights.

    Follows ``HKUNLP/ChunkLlama: chunkllama_attn_replace.py`` (``forward`` without a KV cache, ``merge_attn_outputs``).
    """
    length, stride = q.shape[2], geometry.stride
    device = q.device
    in_chunk = torch.arange(length, device=device) % stride
    k_rot = rotation.apply(k, in_chunk)
    outputs = []
    for begin in range(0, length, stride):
        end = min(begin + stride, length)
        offsets = in_chunk[begin:end]
        q_intra = rotation.apply(q[:, :, begin:end], offsets)
        parts = [_attention_lse(q_intra, k_rot[:, :, begin:end], v[:, :, begin:end], True, scale)]
        if begin > 0:
            q_succ = rotation.apply(q[:, :, begin:end], geometry.successive_query_positions(offsets))
            prev = slice(begin - stride, begin)
            parts.append(_attention_lse(q_succ, k_rot[:, :, prev], v[:, :, prev], False, scale))
        if begin > stride:
            inter = torch.full_like(offsets, geometry.inter_query_position)
            q_inter = rotation.apply(q[:, :, begin:end], inter)
            parts.append(_attention_lse(q_inter, k_rot[:, :, :begin - stride], v[:, :, :begin - stride], False, scale))
        outs = torch.stack([o for o, _ in parts])
        weights = torch.softmax(torch.stack([lse for _, lse in parts]), dim=0).detach()  # ChunkLlama detaches them
        outputs.append((outs * weights[..., None].to(outs.dtype)).sum(0))
    return torch.cat(outputs, dim=2)


def triton_impls(case: str, x: Inputs, args) -> dict[str, Impl]:
    """lce's one-pass Triton kernel for ``case`` (the spec the dispatcher would build for that method)."""
    from lce.kernels.attention import AttentionSpec, flash_attention

    q, k, v, pos = x.q, x.k, x.v, x.pos
    fields: dict = {}
    qr, kr = (q, k) if case in ("alibi", "dca") else x.rotated()
    if case == "alibi":
        fields["alibi_slopes"] = alibi_slopes(q.shape[1]).to(q.device)
    elif case == "logn":
        fields["logn_length"] = args.train_length
    elif case == "window":
        fields["window"] = args.window
    elif case == "dca":
        rotation = x.rotation
        fields.update(segments=dca_geometry(args).segments(),
                      rotary=Rotation(rotation.inv_freq.to(q.device), rotation.attention_scaling, rotation.style))
    spec = AttentionSpec(scale=x.scale, **fields)
    return {"lce_triton": lambda: transposed(flash_attention(qr, kr, v, spec, pos, pos, backend="triton"))}


def with_backward(fn: Impl, x: Inputs) -> Impl:
    """Forward plus backward through ``fn`` (gradients of q, k, v; cleared each call)."""

    def step():
        for t in (x.q, x.k, x.v):
            t.grad = None
        out = fn()
        out.backward(torch.ones_like(out))
        return out

    return step


def run(args) -> list[Point]:
    if args.backward:
        return _run(args)
    with torch.inference_mode():  # a forward benchmark measures evaluation, where no graph is kept
        return _run(args)


def _run(args) -> list[Point]:
    device = torch.device(args.device)
    flex = flex_factory(device) if not args.no_flex else None
    points: list[Point] = []
    for case in args.cases:
        small = Inputs(args, args.check_length, device, grad=False)
        points += check(case, args.check_length, {**peer_impls(case, small, args, flex),
                                                  **triton_or_empty(case, small, args)})
        for length in args.lengths:
            x = Inputs(args, length, device, grad=args.backward)
            impls = {**peer_impls(case, x, args, flex), **triton_or_empty(case, x, args)}
            if args.backward:
                impls = {name: with_backward(fn, x) for name, fn in impls.items()}
            print(f"{case} T={length}: {', '.join(impls)}", flush=True)
            points += measure(case, length, impls, device, tokens=args.batch * length, warmup=args.warmup,
                              repeats=args.repeats)
    return points


def triton_or_empty(case: str, x: Inputs, args) -> dict[str, Impl]:
    from lce.kernels.backend import interpreting

    if x.device.type != "cuda" and not (args.interpreted_triton and interpreting()):
        return {}
    try:
        return triton_impls(case, x, args)
    except ImportError:
        return {}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096])
    p.add_argument("--check-length", type=int, default=384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, default=256, help="sliding-window size of the window case")
    p.add_argument("--train-length", type=int, default=256, help="c of DCA and L of log-n")
    p.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compilation takes minutes on CPU)")
    add_common_arguments(p, "outputs/benchmarks/attention")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    points = run(args)
    env = environment(torch.device(args.device))
    env.update(dtype=args.dtype, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
               pass_="fwd+bwd" if args.backward else "fwd")
    stem = "attention_bwd" if args.backward else "attention"
    report(points, env, args.out, stem, f"{env['device']} {args.dtype} {env['pass_']}")


if __name__ == "__main__":
    main()
