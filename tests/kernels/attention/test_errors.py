"""Bad inputs to flash_attention are LceErrors naming the bad value and what is allowed, on both backends."""

import subprocess
import sys

import pytest
import torch

from lce.errors import LceError
from lce.kernels.attention import flash_attention
from lce.kernels.attention.spec import AttentionSpec
from tests.kernels.attention.cases import DEVICE, on_device, positions, random_qkv, spec_for


def inputs(**changes):
    """Valid arguments on the kernels' device (``cases.DEVICE``) with ``changes`` applied (moved there too, unless
    on the meta device, which stands for "another device")."""
    q, k, v = random_qkv(2, 4, 2, 5, 7, 16)
    q_pos, k_pos = positions(2, 5, 7)
    args = {"q": q, "k": k, "v": v, "spec": AttentionSpec(0.25), "q_pos": q_pos, "k_pos": k_pos}
    args.update(changes)
    return {name: value.to(DEVICE) if isinstance(value, torch.Tensor) and not value.is_meta else value
            for name, value in args.items()}


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("changes,match", [
    ({"q": torch.zeros(2, 4, 5)}, r"q must be 4-D \[B, H, Tq, D\], got \[2, 4, 5\]"),
    ({"k": torch.zeros(3, 2, 7, 16)}, "batch sizes differ"),
    ({"v": torch.zeros(2, 2, 6, 16)}, r"must agree on \[B, HKV, Tk\]"),
    ({"k": torch.zeros(2, 2, 7, 8), "v": torch.zeros(2, 2, 7, 8)}, "head dims differ"),
    ({"k": torch.zeros(2, 3, 7, 16), "v": torch.zeros(2, 3, 7, 16)}, "H = 4 must be a multiple of .* HKV = 3"),
    ({"v": torch.zeros(2, 2, 7, 16, dtype=torch.float16)}, "must share one dtype"),
    ({"k": torch.zeros(2, 2, 7, 16, device="meta"), "v": torch.zeros(2, 2, 7, 16, device="meta")}, "one device"),
    ({"q_pos": torch.zeros(2, 4, dtype=torch.long)}, r"q_pos must be \[B, Tq\] = \[2, 5\], got \[2, 4\]"),
    ({"k_pos": torch.zeros(2, 7)}, "k_pos must hold integer positions, got torch.float32"),
    ({"k_pos": torch.full((2, 7), 2**31)}, "within"),
    ({"spec": "causal"}, "spec must be an AttentionSpec, got str"),
    ({"spec": AttentionSpec(0.25, alibi_slopes=torch.ones(3))}, "3 slopes for H = 4"),
    ({"spec": AttentionSpec(0.25, alibi_slopes=torch.ones(4, device="meta"))}, "spec.alibi_slopes is on meta"),
])
def test_bad_inputs(changes, match, backend):
    if "k_pos" in changes and changes["k_pos"].max() > 2**30 and DEVICE.type == "cuda":
        pytest.skip("positions are range-checked on CPU only (a check on CUDA would synchronise every call)")
    if backend == "triton" and DEVICE.type == "cuda" and any(getattr(t, "is_meta", False) for t in changes.values()):
        match = "on CUDA tensors"  # resolve_backend refuses non-CUDA tensors first
    with pytest.raises(LceError, match=match):
        flash_attention(**inputs(**changes), backend=backend)


def test_rotary_wider_than_the_head():
    spec = on_device(spec_for("rope", dim=32))  # R = 32 > D = 16
    with pytest.raises(LceError, match="rotary dim R = 32 .* exceeds the head dim D = 16"):
        flash_attention(**inputs(spec=spec), backend="ref")


def test_triton_takes_no_fp64_and_no_huge_heads():
    args = inputs()
    args.update({name: args[name].double() for name in "qkv"})
    with pytest.raises(LceError, match="among float16, bfloat16, float32; got torch.float64"):
        flash_attention(**args, backend="triton")
    wide = [t.to(DEVICE) for t in (*random_qkv(1, 1, 1, 3, 3, 320), *positions(1, 3, 3))]
    with pytest.raises(LceError, match="head dims up to 256 .* D = 320"):
        flash_attention(*wide[:3], AttentionSpec(0.1), *wide[3:], backend="triton")


def test_triton_refuses_more_programs_than_the_launch_grid_holds():
    """B * H programs go on the grid's second axis, at most 65535 on CUDA: one more is a named error, not a launch
    failure (the interpreter has no such limit, so only the check can catch it on CPU)."""
    q, k, v = (torch.zeros(4097, heads, 1, 16, device=DEVICE) for heads in (16, 1, 1))
    pos = torch.zeros(4097, 1, dtype=torch.long, device=DEVICE)
    with pytest.raises(LceError, match=r"B \* H = 4097 \* 16 = 65552 .* exceed CUDA's 65535"):
        flash_attention(q, k, v, AttentionSpec(0.25), pos, pos, backend="triton")


def test_importing_compiles_nothing():
    """Importing the package must not import Triton (nor compile or launch anything)."""
    code = "import sys, lce.kernels.attention; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_backward_that_cannot_fit_the_gpu_is_refused_before_the_forward(monkeypatch):
    """On a 99 KB-shared-memory GPU (compute capability 8.6) the fp32 head-dim-256 backward fits no launch
    configuration (``launch.LAUNCH_TABLE``): a one-line LceError before any kernel runs, not a failed launch."""
    from lce.kernels.attention import function

    monkeypatch.setattr(function, "device_capability", lambda t: (8, 6))
    q, k, v = (x.to(DEVICE).requires_grad_() for x in random_qkv(1, 2, 2, 5, 5, 256))
    q_pos, k_pos = (p.to(DEVICE) for p in positions(1, 5, 5))
    with pytest.raises(LceError, match=r"backward dq kernel for float32 at head dim 256 .* capability 8\.6") as info:
        flash_attention(q, k, v, AttentionSpec(0.0625), q_pos, k_pos, backend="triton")
    assert "\n" not in str(info.value)
