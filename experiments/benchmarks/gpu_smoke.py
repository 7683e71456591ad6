"""The first part of ``gpu.sh``: is this environment able to run lce's Triton kernels on the GPU? (seconds)

Imports ``lce`` and ``lce.kernels``, then runs one ``flash_attention`` forward and backward through the Triton
kernels on CUDA (bf16, GQA, an odd length) and compares outputs and gradients with the fp32 reference. The tolerance
follows the flash-attention tests: the kernel's error against the fp32 reference must be at most twice the error of
plain PyTorch (SDPA) in the same dtype, plus a small floor. A broken install, a driver/CUDA mismatch or a kernel that
does not compile for this GPU fails here, before the long parts run.

Without CUDA it fails, unless ``LCE_GPU_DRY_RUN=1``: then it runs the same check on CPU tensors in Triton's
interpreter (fp32, smaller), so the control flow of ``gpu.sh`` can be tried on a machine without a GPU.

    python3 experiments/benchmarks/gpu_smoke.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DRY_RUN = os.environ.get("LCE_GPU_DRY_RUN", "0") not in ("", "0")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


def main() -> int:
    start = time.perf_counter()
    if torch.cuda.is_available():
        device, dtype, length, head_dim = torch.device("cuda"), torch.bfloat16, 777, 128
        print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name(0)}")
    elif DRY_RUN:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when a kernel is defined: before lce.kernels loads
        device, dtype, length, head_dim = torch.device("cpu"), torch.float32, 37, 16
        print(f"torch {torch.__version__}: no CUDA; LCE_GPU_DRY_RUN=1, so Triton's CPU interpreter runs the check")
    else:
        print(f"FAILED: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device "
              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); set LCE_GPU_DRY_RUN=1 to "
              "try gpu.sh without a GPU")
        return 1

    import triton

    import lce
    import lce.kernels
    from lce.kernels.attention import AttentionSpec, flash_attention
    from lce.kernels.backend import resolve_backend

    print(f"lce from {Path(lce.__file__).parent}, lce.kernels from {', '.join(lce.kernels.__path__)}, "
          f"triton {triton.__version__}")

    heads, kv_heads = 4, 2
    g = torch.Generator().manual_seed(0)
    q32, k32, v32 = (torch.randn(1, h, length, head_dim, generator=g).to(device) for h in (heads, kv_heads, kv_heads))
    grad_out = torch.randn(1, length, heads, head_dim, generator=g).to(device)
    pos = torch.arange(length, device=device)[None]
    spec = AttentionSpec(head_dim ** -0.5)

    def run(backend: str | None, q, k, v):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        if backend is None:  # plain PyTorch in the same dtype; [B, H, T, D] -> [B, T, H, D] like lce's kernels
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
        else:
            out = flash_attention(q, k, v, spec, pos, pos, backend=backend)
        out.backward(grad_out.to(out.dtype))
        return [out, q.grad, k.grad, v.grad]

    low = [t.to(dtype) for t in (q32, k32, v32)]
    if resolve_backend("auto", *low) != "triton" and device.type == "cuda":
        print("FAILED: backend 'auto' does not pick Triton for CUDA tensors (is triton importable?)")
        return 1
    want = run("ref", q32, k32, v32)
    got = run("triton", *low)
    baseline = run(None, *low)
    floor = 1e-2 if dtype != torch.float32 else 1e-5
    failed = False
    for name, g_, b_, w_ in zip(("out", "dq", "dk", "dv"), got, baseline, want):
        err, base = relative_error(g_, w_), relative_error(b_, w_)
        ok = err <= 2 * base + floor
        failed |= not ok
        print(f"{name}: relative max error vs fp32 reference {err:.2e} (SDPA {dtype}: {base:.2e}) "
              f"{'ok' if ok else 'TOO LARGE'}")
    print(f"{'FAILED' if failed else 'passed'}: flash_attention forward + backward, B=1 H={heads} HKV={kv_heads} "
          f"T={length} D={head_dim} {dtype} on {device} in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
