"""Triton helpers that make a kernel compute in Triton's CPU interpreter what it computes on a GPU.

Triton's CPU interpreter (3.9) multiplies bf16 tiles as their raw 16-bit patterns and rounds fp32 to bf16 toward
zero. Under it, ``dot`` multiplies 16-bit operands as fp32 and ``round_to`` rounds to nearest even: what the GPU
computes (a product of two 16-bit numbers is exact in fp32, and the tensor cores accumulate in fp32), so the bf16 tests
measure the kernels rather than the interpreter. Compiled for a GPU both are the plain operations.
"""

import triton
import triton.language as tl

from lce.kernels.backend import interpreting

INTERPRETED = tl.constexpr(interpreting())


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """``x`` (fp32) rounded to ``dtype`` (to nearest even)."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16  # exact in bf16 now: the cast below drops zeros
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def dot(a, b, acc):
    """``acc + a @ b`` accumulated in fp32: tensor cores for bf16/fp16 operands, IEEE fp32 (not TF32) for fp32."""
    if INTERPRETED:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")
