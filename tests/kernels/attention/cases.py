"""Shared inputs of the attention kernel tests: random q/k/v, position layouts and one spec per method."""

from __future__ import annotations

import dataclasses

import torch

from lce.attention.block_sparse import BlockSparsePattern
from lce.kernels.attention.spec import IDENTITY, AttentionSpec, PairSelect, PositionMap, Segment
from lce.kernels.rope import Rotation
from lce.posenc import POSENCS, SegmentMethod
from lce.posenc.alibi import alibi_slopes
from lce.posenc.frequencies import rope_inv_freq

ROPE = (Segment(IDENTITY, IDENTITY, PairSelect()),)

#: Every segment method (``lce.posenc.SegmentMethod``) at settings whose segments all act within the test lengths:
#: ``case -> (posenc config, training length L)``. ``test_every_segment_method_has_a_case`` holds the registry to it,
#: so a new method is tested by the reference, fused-path and kernel tests once it is listed here.
SEGMENT_CASES = {
    "dca_code": ({"name": "dca", "chunk_size": 12, "local_window": 4}, 16),
    "dca_paper": ({"name": "dca", "chunk_size": 8, "local_window": 3, "convention": "paper"}, 16),
    "self_extend": ({"name": "self_extend", "group_size": 3, "neighbor_window": 4}, 16),
    "rerope": ({"name": "rerope", "window": 6}, 16),
    "sinks": ({"name": "sinks", "start_size": 2, "recent_size": 6}, 16),
}


def segment_methods() -> list[str]:
    """The names of the registered segment methods."""
    return [name for name in POSENCS.names() if issubclass(POSENCS.get(name), SegmentMethod)]


def method_segments(config: dict, pretraining_length: int) -> tuple[Segment, ...]:
    """The segments of the segment method ``config`` (a posenc dict) for a model trained on ``pretraining_length``."""
    params = dict(config)
    return POSENCS.get(params.pop("name"))(**params).segments(pretraining_length)


def case_segments(case: str) -> tuple[Segment, ...]:
    return method_segments(*SEGMENT_CASES[case])

# Kernel tests run on CUDA where there is one (compiled kernels), else on CPU in Triton's interpreter: the interpreter
# is chosen when kernels are defined (tests/conftest.py), so a CUDA machine cannot interpret CPU tensors.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_device(spec: AttentionSpec, device=DEVICE) -> AttentionSpec:
    """``spec`` with its tensors moved to ``device``."""
    moved = {name: getattr(spec, name).to(device) for name in ("alibi_slopes", "block_mask")
             if getattr(spec, name) is not None}
    if spec.rotary is not None:
        moved["rotary"] = Rotation(spec.rotary.inv_freq.to(device), spec.rotary.attention_scaling, spec.rotary.style)
    return dataclasses.replace(spec, **moved)


def random_qkv(batch=2, heads=4, kv_heads=2, tq=37, tk=37, dim=16, dim_v=None, dtype=torch.float32, seed=0,
               requires_grad=False):
    """``q [B, H, Tq, D]``, ``k [B, HKV, Tk, D]``, ``v [B, HKV, Tk, Dv]``."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, tq, dim), (batch, kv_heads, tk, dim), (batch, kv_heads, tk, dim_v or dim)]
    return [torch.randn(*s, generator=g).to(dtype).requires_grad_(requires_grad) for s in shapes]


def positions(batch: int, tq: int, tk: int, layout: str = "contiguous") -> tuple[torch.Tensor, torch.Tensor]:
    """``q_pos [B, Tq]``, ``k_pos [B, Tk]`` (int64); the queries are the last ``Tq`` keys (a KV cache).

    Layouts: ``contiguous`` (0..Tk-1), ``left_pad`` (row b shifted by 3b: negative key positions),
    ``gaps`` (strictly increasing with random gaps, different per row: positions need not be contiguous).
    """
    if layout == "contiguous":
        k_pos = torch.arange(tk).expand(batch, tk)
    elif layout == "left_pad":
        k_pos = torch.stack([torch.arange(tk) - 3 * b for b in range(batch)])
    elif layout == "gaps":
        g = torch.Generator().manual_seed(1)
        k_pos = torch.cumsum(torch.randint(1, 4, (batch, tk), generator=g), dim=1) - 1
    else:
        raise ValueError(layout)
    return k_pos[:, tk - tq:].contiguous(), k_pos.contiguous()


def rotary(dim: int, rotary_dim: int | None = None, **kwargs) -> Rotation:
    return Rotation(rope_inv_freq(rotary_dim or dim, 10000.0).float(), **kwargs)


def block_sparse_mask(length: int, block: int, **kwargs) -> torch.Tensor:
    """BigBird's block map (``lce.attention.block_sparse``) as a ``[nB, nB]`` bool tensor."""
    pattern = BlockSparsePattern(block, **kwargs)
    n = -(-length // block)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for qb in range(n):
        mask[qb, pattern.key_blocks(qb)] = True
    return mask


def spec_for(case: str, heads: int = 4, dim: int = 16, length: int = 64) -> AttentionSpec:
    """One spec per method and modifier, sized for sequences of about ``length`` tokens."""
    scale = dim ** -0.5
    rope = rotary(dim)
    specs = {
        "causal": lambda: AttentionSpec(scale),
        "alibi": lambda: AttentionSpec(scale, alibi_slopes=alibi_slopes(heads)),
        "logn": lambda: AttentionSpec(scale, logn_length=8),
        "window": lambda: AttentionSpec(scale, window=7),
        "window_sinks": lambda: AttentionSpec(scale, window=5, sink_tokens=3),
        "block_sparse": lambda: AttentionSpec(scale, block_mask=block_sparse_mask(length, 8, window_blocks=2,
                                                                                  random_blocks=1),
                                              block_size=8),
        "rope": lambda: AttentionSpec(scale, ROPE, rope),
        "partial_rotary": lambda: AttentionSpec(scale, ROPE, rotary(dim, dim // 2)),
        "interleaved": lambda: AttentionSpec(scale, ROPE, rotary(dim, style="interleaved")),
        "attention_scaling": lambda: AttentionSpec(scale, ROPE, rotary(dim, attention_scaling=1.3)),
        **{case: (lambda case=case: AttentionSpec(scale, case_segments(case), rope)) for case in SEGMENT_CASES},
        "rerope": lambda: AttentionSpec(scale, case_segments("rerope"), rope, logn_length=16),
        # Segments that overlap: the second (grouped positions) owns the far pairs the first also selects.
        "overlapping": lambda: AttentionSpec(scale, (ROPE[0], Segment(PositionMap(div=2), PositionMap(div=2),
                                                                      PairSelect(lo=5))), rope),
        "dca_window_alibi": lambda: AttentionSpec(scale, case_segments("dca_code"),
                                                  rotary(dim, dim // 2, style="interleaved", attention_scaling=0.9),
                                                  alibi_slopes=alibi_slopes(heads), window=20, sink_tokens=2,
                                                  logn_length=10),
    }
    return specs[case]()


CASES = ["causal", "alibi", "logn", "window", "window_sinks", "block_sparse", "rope", "partial_rotary",
         "interleaved", "attention_scaling", "dca_code", "dca_paper", "self_extend", "rerope", "sinks",
         "overlapping", "dca_window_alibi"]


# The flash-attention rule (Dao et al., tests/test_flash_attn.py): the kernel's error against an exact reference may
# be at most twice that of plain PyTorch in the same dtype, plus a floor for when PyTorch happens to be exact.
# fp32: the kernel and PyTorch both round at ~6e-8 relative but sum in different orders with different exp/cos
# implementations; on these O(1) values we measured kernel errors up to 1.3e-6, so 1e-5 is tight yet never flaky.
# fp16 / bf16: one unit in the last place at 1.0 (2^-10, 2^-7).
FLOOR = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def outputs_and_grads(fn, inputs, grad_out):
    """``fn(*inputs)`` and the gradients of ``sum(out * grad_out)`` with respect to ``inputs``."""
    out = fn(*inputs)
    return [out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype))]


def assert_flash_close(kernel_fn, reference_fn, q, k, v, seed=0):
    """Compare ``kernel_fn(q, k, v)`` (output and dq, dk, dv) against ``reference_fn`` in fp64 (exact) under the
    flash-attention rule, using ``reference_fn`` in the inputs' dtype as "PyTorch in the same dtype"."""
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out_shape = (q.shape[0], q.shape[2], q.shape[1], v.shape[3])  # [B, Tq, H, Dv]
    grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(q.device)
    exact = outputs_and_grads(reference_fn, exact_inputs, grad_out)
    kernel = outputs_and_grads(kernel_fn, inputs, grad_out)
    eager = outputs_and_grads(reference_fn, [t.detach().requires_grad_() for t in (q, k, v)], grad_out)
    for name, got, same_dtype, want in zip(("out", "dq", "dk", "dv"), kernel, eager, exact):
        assert got.dtype == q.dtype and got.shape == want.shape, name
        error = (got.double() - want).abs().max().item()
        bound = 2 * (same_dtype.double() - want).abs().max().item() + FLOOR[q.dtype]
        assert error <= bound, f"{name}: max error {error:.3g} > bound {bound:.3g} (2 x PyTorch {q.dtype} + floor)"
