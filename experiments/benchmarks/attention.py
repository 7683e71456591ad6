"""Attention benchmark (issues #5, #14): lce's one-pass Triton kernel against its peers, forward and forward+backward,
measured side by side in one run (``harness.measure``: output and gradients checked at every size, then timed).

Cases (``[B, H, T, D]`` inputs, GQA with ``H / HKV`` query heads per KV head) and their peers:

- ``causal``: SDPA pinned to its flash kernel (``sdpa_kernel([SDPBackend.FLASH_ATTENTION])``, the reference),
  compiled FlexAttention (causal ``BlockMask``), ``flash_attn_func`` (flash-attn package).
- ``alibi``: FlexAttention (``score_mod``, the reference), flash-attn (``alibi_slopes``).
- ``logn``: SDPA flash on queries scaled by ``max(1, ln(i + 1) / ln(L))`` (the reference), FlexAttention
  (``score_mod``).
- ``window``: FlexAttention (sliding-window ``BlockMask``, the reference), flash-attn (``window_size``).
- ``sinks``, ``dca``, ``self_extend``, ``rerope``: the position-remapping methods (``lce.posenc.*`` segments; q and
  k unrotated, each method rotates them itself). Peer and reference: ``flex_merge``, one compiled FlexAttention call
  per segment (q and k rotated at that segment's positions, the segment's pairs as ``BlockMask``) merged with their
  log-sum-exps (not detached: exact gradients). ``dca`` also has ``chunkllama_3call``: ChunkLlama's three calls per
  query chunk (intra, successive, inter; ``chunkllama_attn_replace.py``) merged with detached LSE weights, through
  ``flash_attn_func`` when installed, else SDPA's flash kernel with its LSE; K/V are never repeated: GQA is the query
  heads of one KV head moved into the batch against a stride-0 K/V. Its gradients differ by design (detached
  weights), so only its output is compared.

``lce_triton`` (``lce.kernels.attention.flash_attention(..., backend="triton")``) runs on CUDA (and in the CPU
interpreter with ``--interpreted-triton``); ``--pytorch-paths`` adds ``lce_ref``, lce's PyTorch path of each method
(what a CPU runs). FLOPs per call are ``4 B H D`` per visible (query, key) pair, so causal is ``2 B H T^2 D`` forward,
and x3.5 for forward+backward (backward = 2.5x forward). FlexAttention compiles once per (length, mode) in the check
call, before any timing; its block masks are built once per (case, length). A peer that is not installed gets an
``unavailable: ...`` row. Output: ``<stem>.csv`` (long format, rewritten after every point), ``<stem>.png``
(``--stem``, default ``attention``), tables and ratios printed; exit code 1 when a row of lce's errs or mismatches.

    python experiments/benchmarks/attention.py --dtype bfloat16 --heads 32 --kv-heads 8 --head-dim 128 \\
        --modes fwd fwd+bwd --lengths 8192 65536 --bwd-lengths 16384 --out OUT_DIR
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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

from lce.kernels.attention import AttentionSpec, flash_attention
from lce.kernels.attention.spec import Segment
from lce.kernels.rope import Rotation
from lce.posenc.alibi import alibi_slopes
from lce.posenc.dca import DcaGeometry
from lce.posenc.logn import logn_scale
from lce.posenc.rerope import rerope_segments
from lce.posenc.self_extend import self_extend_segments
from lce.posenc.sinks import sink_segments

CASES = ("causal", "alibi", "logn", "window", "sinks", "dca", "self_extend", "rerope")
SEGMENT_CASES = ("sinks", "dca", "self_extend", "rerope")
#: Which implementation the others are checked against, per case (the first of these that runs here).
REFERENCES = {"causal": ("sdpa_flash", "flex", "lce_ref"), "alibi": ("flex", "lce_ref"),
              "logn": ("sdpa_flash", "flex", "lce_ref"), "window": ("flex", "lce_ref")}
BIG = 2**30  # an open bound in the FlexAttention mask parameters


class Inputs:
    """Random q/k/v (unrotated) and positions for one length; leaves with gradients in ``fwd+bwd``."""

    def __init__(self, args, length: int, device: torch.device, grad: bool):
        gen = torch.Generator(device="cpu").manual_seed(length)
        dtype = getattr(torch, args.dtype)
        b, h, hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
        self.q, self.k, self.v = (torch.randn(shape, generator=gen).to(device, dtype).requires_grad_(grad)
                                  for shape in ((b, h, length, d), (b, hkv, length, d), (b, hkv, length, d)))
        self.pos = torch.arange(length, device=device)[None].expand(b, length)
        self.scale = d ** -0.5
        self.length, self.device, self.grad = length, device, grad
        self.rotation = Rotation((1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)).to(device))

    def rotated(self) -> dict[str, torch.Tensor]:
        """q and k rotated at their positions (new leaves): the input of the cases without segments."""
        with torch.no_grad():
            q, k = self.rotation.apply(self.q, self.pos), self.rotation.apply(self.k, self.pos)
        return {"q": q.requires_grad_(self.grad), "k": k.requires_grad_(self.grad), "v": self.v}

    def unrotated(self) -> dict[str, torch.Tensor]:
        return {"q": self.q, "k": self.k, "v": self.v}


def visible_pairs(case: str, length: int, args) -> int:
    """(query, key) pairs a query row sees, summed over the rows: what the FLOPs count."""
    causal = length * (length + 1) // 2
    if case == "window":
        w = min(args.window, length)
        return causal - (length - w) * (length - w + 1) // 2
    if case == "sinks":
        r, s = min(args.window, length), args.sink_tokens
        window = causal - (length - r) * (length - r + 1) // 2
        return window + sum(max(0, min(s, i + 1 - r)) for i in range(r, length))
    return causal


def attention_flops(case: str, length: int, args, mode: str) -> float:
    forward = 4 * args.batch * args.heads * args.head_dim * visible_pairs(case, length, args)
    return forward * (3.5 if mode == "fwd+bwd" else 1.0)


def lce_spec(case: str, args, x: Inputs) -> AttentionSpec:
    """The spec the dispatcher builds for ``case`` (the segments from each method's ``lce.posenc`` module)."""
    fields: dict = {}
    if case == "alibi":
        fields["alibi_slopes"] = alibi_slopes(args.heads).to(x.device)
    elif case == "logn":
        fields["logn_length"] = args.train_length
    elif case == "window":
        fields["window"] = args.window
    elif case in SEGMENT_CASES:
        fields.update(segments=segments(case, args), rotary=x.rotation)
        if case == "sinks":
            fields.update(window=args.window, sink_tokens=args.sink_tokens)
    return AttentionSpec(scale=x.scale, **fields)


def segments(case: str, args) -> tuple[Segment, ...]:
    if case == "dca":
        return dca_geometry(args).segments()
    if case == "self_extend":
        return self_extend_segments(args.group_size, args.neighbor_window)
    if case == "rerope":
        return rerope_segments(args.rerope_window)
    return sink_segments(args.sink_tokens, args.window)


def dca_geometry(args) -> DcaGeometry:
    c = args.train_length
    return DcaGeometry(c, c * 3 // 4, c // 8, "code")


def to_lce_layout(out: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` (SDPA, FlexAttention) -> ``[B, T, H, D]`` (lce's kernels, flash-attn): a view."""
    return out.transpose(1, 2)


def sdpa_flash(q, k, v, **kwargs) -> torch.Tensor:
    """SDPA pinned to its flash kernel (an error, not a silent fallback, where that kernel cannot run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kwargs)


# FlexAttention.


class Flex:
    """Compiled FlexAttention and the block masks of one length (built once, outside the timing)."""

    def __init__(self, device: torch.device):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # One graph per (length, mode, score_mod), more than dynamo's default limit of 8 recompilations, past which
        # flex_attention would fall back to its unfused eager form.
        torch._dynamo.config.recompile_limit = 256
        torch._dynamo.config.accumulated_recompile_limit = 4096
        self.attention = torch.compile(flex_attention, dynamic=False)
        self.create_block_mask = create_block_mask
        self.device = device
        self.masks: dict = {}

    def block_mask(self, length: int, window: int = BIG, sinks: int = 0, div: int = 1, lo: int = -BIG,
                   hi: int = BIG, key_below: int = BIG):
        """Causal pairs with ``i - j < window or j < sinks`` and ``lo <= i // div - j // div < hi``, ``j <
        key_below``: one mask function whose parameters are a tensor, so every case shares its compiled kernels."""
        key = (length, window, sinks, div, lo, hi, key_below)
        if key not in self.masks:
            params = torch.tensor([window, sinks, div, lo, hi, key_below], device=self.device)

            def mask_mod(b, h, i, j):
                gap = i // params[2] - j // params[2]
                return ((i >= j) & ((i - j < params[0]) | (j < params[1])) & (gap >= params[3]) & (gap < params[4])
                        & (j < params[5]))

            self.masks[key] = self.create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length,
                                                     device=str(self.device), _compile=self.device.type == "cuda")
        return self.masks[key]

    def __call__(self, q, k, v, mask, score_mod=None, return_lse=False):
        return self.attention(q, k, v, score_mod=score_mod, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1],
                              return_lse=return_lse)


def flex_or_reason(args, device: torch.device) -> Flex | Unavailable:
    if args.no_flex:
        return Unavailable("skipped (--no-flex)")
    try:
        return Flex(device)
    except Exception as error:  # noqa: BLE001 - an old torch, no compiler: the peer is recorded as unavailable
        return Unavailable(f"FlexAttention: {type(error).__name__}: {error}")


def flex_merge(flex: Flex, x: Inputs, segs: tuple[Segment, ...], length: int, args, extra: dict) -> torch.Tensor:
    """One FlexAttention call per segment (its pairs as a block mask; q and k rotated at its positions), merged by
    their log-sum-exps, differentiably: the one-softmax result with exact gradients. The segments of these methods
    select disjoint pairs."""
    outs, lses = [], []
    for seg, mask in zip(segs, extra["masks"]):
        q = x.rotation.apply(x.q, seg.q_map(x.pos))
        k = x.rotation.apply(x.k, seg.k_map(x.pos))
        out, lse = flex(q, k, x.v, mask, return_lse=True)
        outs.append(out)
        lses.append(lse)
    weights = torch.softmax(torch.stack(lses), dim=0)
    return to_lce_layout((torch.stack(outs) * weights[..., None].to(outs[0].dtype)).sum(0))


def segment_masks(flex: Flex, case: str, segs: tuple[Segment, ...], length: int, args) -> list:
    masks = []
    for seg in segs:
        sel = seg.select
        bounds = {"div": sel.div, "lo": -BIG if sel.lo is None else sel.lo, "hi": BIG if sel.hi is None else sel.hi,
                  "key_below": BIG if sel.key_below is None else sel.key_below}
        masks.append(flex.block_mask(length, **bounds))
    return masks


# flash-attn and ChunkLlama's three-call DCA.


def flash_attn_func():
    """The flash-attn package's ``flash_attn_func``, or the reason it cannot be used."""
    try:
        from flash_attn import flash_attn_func as func
    except ImportError as error:
        return Unavailable(f"flash-attn not installed ({error})")
    return func


def attention_lse(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention call returning ``(out [B, H, Tq, D], lse [B, H, Tq])``, as ChunkLlama's ``flash_attn_func``
    calls do, without repeating K/V: flash-attn takes GQA natively; SDPA's flash kernel gets each KV head's query
    heads as batch rows against K/V expanded with batch stride 0 (a view, nothing copied)."""
    func = flash_attn_func()
    if not isinstance(func, Unavailable) and q.is_cuda:
        out, lse, _ = func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                           causal=causal, return_attn_probs=True)
        return out.transpose(1, 2), lse[..., :q.shape[2]]
    b, h, tq, d = q.shape
    hkv = k.shape[1]
    groups = h // hkv
    outs, lses = [], []
    for row in range(b):  # the batch axis carries the groups: one batch row at a time
        qg = q[row].view(hkv, groups, tq, d).transpose(0, 1)  # [G, HKV, Tq, D]
        kg, vg = (t[row:row + 1].expand(groups, *t.shape[1:]) for t in (k, v))
        if q.is_cuda:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qg, kg, vg, 0.0, causal, False,
                                                                          scale=scale)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qg, kg, vg, 0.0, causal,
                                                                                  scale=scale)
        outs.append(out.transpose(0, 1).reshape(h, tq, -1))
        lses.append(lse[..., :tq].transpose(0, 1).reshape(h, tq))
    return torch.stack(outs), torch.stack(lses)


def chunkllama_dca(x: Inputs, geometry: DcaGeometry) -> torch.Tensor:
    """ChunkLlama's DCA: per query chunk, intra (causal), successive and inter calls merged with detached LSE weights.

    Follows ``HKUNLP/ChunkLlama: chunkllama_attn_replace.py`` (``forward`` without a KV cache, ``merge_attn_outputs``).
    """
    q, k, v, rotation, scale = x.q, x.k, x.v, x.rotation, x.scale
    length, stride = q.shape[2], geometry.stride
    intra, successive, inter = geometry.segments()  # the positions each call rotates at (ChunkLlama's code)
    positions = torch.arange(length, device=q.device)
    k_rot = rotation.apply(k, intra.k_map(positions))
    outputs = []
    for begin in range(0, length, stride):
        end = min(begin + stride, length)
        chunk = positions[begin:end]
        q_chunk = q[:, :, begin:end]
        parts = [attention_lse(rotation.apply(q_chunk, intra.q_map(chunk)), k_rot[:, :, begin:end],
                               v[:, :, begin:end], True, scale)]
        if begin > 0:
            prev = slice(begin - stride, begin)
            parts.append(attention_lse(rotation.apply(q_chunk, successive.q_map(chunk)), k_rot[:, :, prev],
                                       v[:, :, prev], False, scale))
        if begin > stride:
            parts.append(attention_lse(rotation.apply(q_chunk, inter.q_map(chunk)), k_rot[:, :, :begin - stride],
                                       v[:, :, :begin - stride], False, scale))
        outs = torch.stack([o for o, _ in parts])
        weights = torch.softmax(torch.stack([lse for _, lse in parts]), dim=0).detach()  # ChunkLlama detaches them
        outputs.append((outs * weights[..., None].to(outs.dtype)).sum(0))
    return to_lce_layout(torch.cat(outputs, dim=2))


# The implementations of one case.


def peer_impls(case: str, x: Inputs, args, flex: Flex | Unavailable, mode: str) -> dict[str, Impl | Unavailable]:
    """The peers of ``case`` (reference candidates first), each with the leaves it differentiates."""
    length, device = x.length, x.device
    slopes = alibi_slopes(args.heads).to(device)
    no_flex = flex if isinstance(flex, Unavailable) else None
    if no_flex is None and device.type != "cuda" and mode == "fwd+bwd":
        no_flex = Unavailable("FlexAttention has no CPU backward")
    fa = flash_attn_func()
    if not isinstance(fa, Unavailable) and (device.type != "cuda" or x.q.dtype == torch.float32):
        fa = Unavailable("flash-attn runs fp16/bf16 on CUDA only")
    impls: dict[str, Impl | Unavailable] = {}
    if case in SEGMENT_CASES:
        leaves = x.unrotated()
        segs = segments(case, args)
        if no_flex is None and device.type != "cuda":
            no_flex = Unavailable("compiled FlexAttention returns no LSE on CPU")
        if no_flex is None:
            masks = segment_masks(flex, case, segs, length, args)
            impls["flex_merge"] = Impl(functools.partial(flex_merge, flex, x, segs, length, args, {"masks": masks}),
                                       leaves, "flex (compiled), one call per segment, LSE merge")
        else:
            impls["flex_merge"] = no_flex
        if case == "dca":
            backend = ("flash_attn" if not isinstance(fa, Unavailable) else
                       "sdpa:FLASH_ATTENTION (aten op with LSE), GQA as batch rows")
            impls["chunkllama_3call"] = Impl(functools.partial(chunkllama_dca, x, dca_geometry(args)), leaves,
                                             backend, compare_grads=False)
        return impls
    leaves = x.rotated()
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    if case == "causal":
        impls["sdpa_flash"] = Impl(lambda: to_lce_layout(sdpa_flash(q, k, v, is_causal=True)), leaves,
                                   "sdpa:FLASH_ATTENTION")
    if case == "logn":
        factor = logn_scale(args.train_length)(x.pos[0])  # [T]
        impls["sdpa_flash"] = Impl(
            lambda: to_lce_layout(sdpa_flash(q * factor[None, None, :, None].to(q.dtype), k, v, is_causal=True)),
            leaves, "sdpa:FLASH_ATTENTION on scaled queries")
    if no_flex is None:
        mask = flex.block_mask(length, window=args.window) if case == "window" else flex.block_mask(length)
        score_mod = None
        if case == "alibi":
            def score_mod(score, b, h, i, j):
                return score - slopes[h] * (i - j)
        elif case == "logn":
            factor = logn_scale(args.train_length)(x.pos[0])

            def score_mod(score, b, h, i, j):
                return score * factor[i]
        impls["flex"] = Impl(lambda: to_lce_layout(flex(q, k, v, mask, score_mod)), leaves, "flex (compiled)")
    else:
        impls["flex"] = no_flex
    if case in ("causal", "alibi", "window"):
        if isinstance(fa, Unavailable):
            impls["flash_attn"] = fa
        else:
            kwargs = {"alibi": {"alibi_slopes": slopes}, "window": {"window_size": (args.window - 1, 0)}}.get(case, {})
            impls["flash_attn"] = Impl(lambda: fa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  causal=True, **kwargs), leaves, "flash_attn")
    return impls


def lce_impls(case: str, x: Inputs, args, mode: str, flex_missing: bool) -> dict[str, Impl | Unavailable]:
    """lce's Triton kernel of ``case`` and, with ``--pytorch-paths`` (or as the reference of a forward when
    FlexAttention is missing), lce's PyTorch path."""
    impls: dict[str, Impl | Unavailable] = {}
    leaves = x.unrotated() if case in SEGMENT_CASES else x.rotated()
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    spec = lce_spec(case, args, x)
    if args.pytorch_paths or (flex_missing and mode == "fwd" and case not in ("causal", "logn")):
        impls["lce_ref"] = Impl(lambda: pytorch_path(case, q, k, v, spec, x, args), leaves, "lce PyTorch path")
    if native_triton(x.device, args.interpreted_triton):
        impls["lce_triton"] = Impl(lambda: flash_attention(q, k, v, spec, x.pos, x.pos, backend="triton"), leaves,
                                   "triton")
    else:
        impls["lce_triton"] = Unavailable("Triton kernels run on CUDA (or --interpreted-triton)")
    return impls


def pytorch_path(case: str, q, k, v, spec: AttentionSpec, x: Inputs, args) -> torch.Tensor:
    """What ``backend=auto`` runs off CUDA for ``case``: lce's block-wise / segment paths (never ``T x T``)."""
    from lce.core.segments import SegmentLayer
    from lce.posenc.alibi import alibi_attention

    if case == "alibi":
        return alibi_attention(q, k, v, spec.alibi_slopes, x.pos, x.pos, x.scale)
    if case == "logn":
        factor = logn_scale(args.train_length)(x.pos[0])
        return to_lce_layout(F.scaled_dot_product_attention(q * factor[None, None, :, None].to(q.dtype), k, v,
                                                            is_causal=True, enable_gqa=True))
    if case in SEGMENT_CASES:
        layer = SegmentLayer(case, spec.segments, x.rotation, window=spec.window, sink_tokens=spec.sink_tokens)
        return layer.attend(q, k, v, x.pos, x.pos, x.scale, None)
    if case == "window":
        from lce.attention.sliding_window import SlidingWindowPattern
        from lce.core.blockwise import blockwise_attention

        pattern = SlidingWindowPattern(args.window)
        return blockwise_attention(q, k, v, x.pos, x.pos, x.scale, visible=pattern, block_size=pattern.query_block)
    return to_lce_layout(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


def reference_of(case: str, impls: dict) -> str | None:
    """The first runnable reference candidate of ``case`` (segment cases: the exact FlexAttention merge)."""
    candidates = REFERENCES.get(case, ("flex_merge", "lce_ref"))
    return next((name for name in candidates if isinstance(impls.get(name), Impl)), None)


def run(args, on_points=None) -> list[Point]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    flex = flex_or_reason(args, device)
    points: list[Point] = []
    for mode in args.modes:  # then length, then case: a run cut short keeps every case of the lengths it finished
        for length in args.lengths if mode == "fwd" else args.bwd_lengths or args.lengths:
            for case in args.cases:
                x = Inputs(args, length, device, grad=mode == "fwd+bwd")
                with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
                    impls = {**peer_impls(case, x, args, flex, mode),
                             **lce_impls(case, x, args, mode, isinstance(flex, Unavailable))}
                reference = reference_of(case, impls)
                print(f"{case} {mode} T={length}: {', '.join(impls)} (reference {reference})", flush=True)
                points += measure(case, mode, length, impls, reference, device, timing(args),
                                  flops=attention_flops(case, length, args, mode), tokens=args.batch * length,
                                  dtype=dtype)
                del x, impls
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if on_points is not None:
                    on_points(points)
    return points


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048], help="lengths of the fwd mode")
    p.add_argument("--bwd-lengths", nargs="+", type=int, default=None,
                   help="lengths of the fwd+bwd mode (default: --lengths)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, default=256, help="sliding window of window; recent tokens of sinks")
    p.add_argument("--sink-tokens", type=int, default=4, help="StreamingLLM sink tokens of sinks")
    p.add_argument("--train-length", type=int, default=256, help="c of DCA (chunk 3c/4, local c/8), L of log-n")
    p.add_argument("--group-size", type=int, default=8, help="Self-Extend G")
    p.add_argument("--neighbor-window", type=int, default=128, help="Self-Extend W")
    p.add_argument("--rerope-window", type=int, default=128, help="ReRoPE w")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compilation takes minutes on CPU)")
    p.add_argument("--pytorch-paths", action="store_true", help="also time lce's PyTorch paths (lce_ref)")
    p.add_argument("--stem", default="attention", help="output files <stem>.csv and <stem>.png")
    add_common_arguments(p, "outputs/benchmarks/attention")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    env = environment(torch.device(args.device))
    env.update(dtype=args.dtype, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    csv_path = args.out / f"{args.stem}.csv"
    points = run(args, on_points=lambda pts: write_csv(pts, env, csv_path))  # a killed run keeps what it measured
    return report(points, env, args.out, args.stem, f"{env['device']} {args.dtype}")


if __name__ == "__main__":
    sys.exit(main())
