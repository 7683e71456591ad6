"""Shared inputs of the attention kernel tests: random q/k/v, position layouts and one spec per method."""

from __future__ import annotations

import dataclasses

import torch

from lce.attention.block_sparse import BlockSparsePattern
from lce.kernels.attention import segments
from lce.kernels.attention.spec import IDENTITY, AttentionSpec, PairSelect, Rotary, Segment
from lce.posenc.alibi import alibi_slopes
from lce.posenc.frequencies import rope_inv_freq

ROPE = (Segment(IDENTITY, IDENTITY, PairSelect()),)

# Kernel tests run on CUDA where there is one (compiled kernels), else on CPU in Triton's interpreter: the interpreter
# is chosen when kernels are defined (tests/conftest.py), so a CUDA machine cannot interpret CPU tensors.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_device(spec: AttentionSpec, device=DEVICE) -> AttentionSpec:
    """``spec`` with its tensors moved to ``device``."""
    moved = {name: getattr(spec, name).to(device) for name in ("alibi_slopes", "block_mask")
             if getattr(spec, name) is not None}
    if spec.rotary is not None:
        moved["rotary"] = Rotary(spec.rotary.inv_freq.to(device), spec.rotary.attention_scaling, spec.rotary.style)
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


def rotary(dim: int, rotary_dim: int | None = None, **kwargs) -> Rotary:
    return Rotary(rope_inv_freq(rotary_dim or dim, 10000.0).float(), **kwargs)


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
        "dca_code": lambda: AttentionSpec(scale, segments.dca_code_segments(12, 4), rope),
        "dca_paper": lambda: AttentionSpec(scale, segments.dca_paper_segments(8, 3, 16), rope),
        "self_extend": lambda: AttentionSpec(scale, segments.self_extend_segments(3, 4), rope),
        "rerope": lambda: AttentionSpec(scale, segments.rerope_segments(6), rope, logn_length=16),
        "sinks": lambda: AttentionSpec(scale, segments.sink_segments(2, 6), rope),
        "dca_window_alibi": lambda: AttentionSpec(scale, segments.dca_code_segments(12, 4),
                                                  rotary(dim, dim // 2, style="interleaved", attention_scaling=0.9),
                                                  alibi_slopes=alibi_slopes(heads), window=20, sink_tokens=2,
                                                  logn_length=10),
    }
    return specs[case]()


CASES = ["causal", "alibi", "logn", "window", "window_sinks", "block_sparse", "rope", "partial_rotary",
         "interleaved", "attention_scaling", "dca_code", "dca_paper", "self_extend", "rerope", "sinks",
         "dca_window_alibi"]


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
