"""RoPE: the reference equals transformers (Llama's half pairing, Cohere's interleaved pairing) and ``Rotation.apply``
bit for bit; the fused Triton kernel (interpreted on CPU) equals the reference forward and backward on awkward cases
(partial rotary, interleaved, attention scaling, GQA, odd lengths, transposed views, positions ``[T]``, ``[1, T]``,
``[B, T]``, 16-bit inputs); bad input is a clear error.

Tolerance of Triton vs the reference in fp32: the kernel takes cos and sin from another math library (numpy in the
interpreter, libdevice on GPU; each within 1 ulp of torch's) and may fuse multiply-adds, so outputs of magnitude up to
~6 (Gaussian inputs, |cos|, |sin| <= 1.5 with the scaling) differ by a few ulp (ulp(4) = 4.8e-7): atol 2e-6 and rtol
1e-6. A wrong pairing, sign or angle is an O(1) error.
"""

import pytest
import torch
import triton
import triton.language as tl

from lce.errors import ConfigError, LceError
from lce.hf.adapters import adapter_for
from lce.kernels.rope import Rotation, apply_rope, rope, rope_reference
from lce.kernels.rope import function as dispatch
from lce.kernels.rope.triton_rope import head_offsets
from tests.conftest import make_tiny_llama

FP32 = {"atol": 2e-6, "rtol": 1e-6}


def inv_freq(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)


def heads(batch, count, length, dim, seed, dtype=torch.float32, transposed=False):
    """``[B, count, T, D]`` Gaussian; ``transposed`` gives the ``[B, T, count, D]``-contiguous view a model makes."""
    g = torch.Generator().manual_seed(seed)
    if transposed:
        return torch.randn(batch, length, count, dim, generator=g, dtype=dtype).transpose(1, 2)
    return torch.randn(batch, count, length, dim, generator=g, dtype=dtype)


def positions(batch, length, form, seed=0):
    """Positions as ``[B, T]`` (distinct rows, large values), ``[1, T]`` or ``[T]``."""
    g = torch.Generator().manual_seed(seed)
    if form == "BT":
        return torch.randint(0, 5000, (batch, length), generator=g)
    p = torch.arange(length) * 7 + 3
    return p[None] if form == "1T" else p


def test_reference_matches_transformers_llama_bit_for_bit():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = make_tiny_llama()
    rotary = model.model.rotary_emb
    rotation = adapter_for(model).rotation(rotary)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [5, 9, 13, 100, 1000, 7, 3, 2, 1]])
    for dtype in (torch.float32, torch.bfloat16):
        x = heads(2, 4, 9, 16, seed=0, dtype=dtype)
        cos, sin = rotary(x, pos)
        expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
        assert torch.equal(rope_reference(x, pos, rotation.inv_freq, rotation.attention_scaling), expected)


def test_reference_matches_transformers_cohere_interleaved_bit_for_bit():
    from transformers.models.cohere.modeling_cohere import apply_rotary_pos_emb

    freqs = inv_freq(16, base=500.0)
    x = heads(2, 3, 11, 16, seed=1)
    pos = positions(2, 11, "BT")
    angles = torch.repeat_interleave(pos[..., None].float() * freqs, 2, dim=-1)  # CohereRotaryEmbedding.forward
    expected, _ = apply_rotary_pos_emb(x, x, angles.cos() * 1.25, angles.sin() * 1.25)
    assert torch.equal(rope_reference(x, pos, freqs, 1.25, "interleaved"), expected)


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rotation_apply_is_the_reference(style, monkeypatch):
    """``Rotation.apply`` (what DCA, Self-Extend, ReRoPE, sinks rotate with) runs the op: on CPU the reference."""
    monkeypatch.delenv("LCE_BACKEND", raising=False)
    rotation = Rotation(inv_freq(12), attention_scaling=1.1, style=style)
    x, pos = heads(2, 4, 9, 16, seed=2), positions(2, 9, "BT")
    assert torch.equal(rotation.apply(x, pos), rope_reference(x, pos, rotation.inv_freq, 1.1, style))


# (B, H, HKV, T, D, R, style, scaling, positions, transposed)
CASES = [
    pytest.param((2, 4, 2, 9, 16, 16, "half", 1.0, "BT", False), id="gqa-half"),
    pytest.param((2, 4, 2, 9, 16, 16, "interleaved", 1.0, "BT", False), id="gqa-interleaved"),
    pytest.param((1, 3, 1, 7, 24, 8, "half", 1.0, "T", False), id="mqa-partial-R8-of-D24-positions-T"),
    pytest.param((2, 2, 2, 5, 20, 12, "interleaved", 1.2, "1T", False), id="partial-interleaved-scaled-positions-1T"),
    pytest.param((2, 6, 3, 13, 16, 16, "half", 0.9, "BT", True), id="transposed-views-odd-T-scaled"),
    pytest.param((1, 5, 5, 3, 10, 10, "half", 1.0, "T", True), id="mha-5-heads-T3"),
]


def case_inputs(case, dtype=torch.float32):
    batch, h, hkv, length, dim, rotary_dim, style, scaling, form, transposed = case
    q = heads(batch, h, length, dim, seed=3, dtype=dtype, transposed=transposed).requires_grad_()
    k = heads(batch, hkv, length, dim, seed=4, dtype=dtype, transposed=transposed).requires_grad_()
    return q, k, positions(batch, length, form), inv_freq(rotary_dim), scaling, style


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_the_reference_forward_and_backward(case):
    q, k, pos, freqs, scaling, style = case_inputs(case)
    q_rot, k_rot = apply_rope(q, k, pos, freqs, scaling, style, backend="triton")
    q_ref, k_ref = apply_rope(q, k, pos, freqs, scaling, style, backend="ref")
    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    torch.testing.assert_close(q_rot, q_ref, **FP32)
    torch.testing.assert_close(k_rot, k_ref, **FP32)
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(t.shape, generator=g) for t in (q_ref, k_ref)]
    grads = torch.autograd.grad((q_rot * weights[0]).sum() + (k_rot * weights[1]).sum(), (q, k))
    ref_grads = torch.autograd.grad((q_ref * weights[0]).sum() + (k_ref * weights[1]).sum(), (q, k))
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, **FP32)


def test_single_tensor_and_keys_without_gradient():
    """``rope`` rotates one tensor; a gradient reaches q alone when only q's output is used."""
    q, k, pos, freqs, scaling, style = case_inputs(CASES[2].values[0])
    torch.testing.assert_close(rope(q, pos, freqs, scaling, style, backend="triton"),
                               rope_reference(q, pos, freqs, scaling, style), **FP32)
    q_rot, _ = apply_rope(q, k, pos, freqs, scaling, style, backend="triton")
    (grad,) = torch.autograd.grad(q_rot.sum(), (q,))
    (ref,) = torch.autograd.grad(rope_reference(q, pos, freqs, scaling, style).sum(), (q,))
    torch.testing.assert_close(grad, ref, **FP32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16_bit_inputs_are_at_least_as_accurate_as_the_reference(dtype):
    """Triton rotates in fp32 and rounds once; the reference (transformers' arithmetic) rounds cos, sin and each
    product to the 16-bit dtype. Against the fp64 rotation, Triton's error is at most 2x the reference's
    (flash-attention's criterion); observed ~0.5x (fp16) and ~0.9x (bf16)."""
    q, k, pos, freqs, scaling, style = case_inputs(CASES[4].values[0], dtype)
    q_rot, k_rot = apply_rope(q, k, pos, freqs, scaling, style, backend="triton")
    assert q_rot.dtype == k_rot.dtype == dtype
    for out, x in ((q_rot, q), (k_rot, k)):
        exact = rope_reference(x.double(), pos, freqs, scaling, style)
        ref_error = (rope_reference(x, pos, freqs, scaling, style).double() - exact).abs().max()
        assert (out.double() - exact).abs().max() <= 2 * ref_error


@triton.jit
def head_offsets_kernel(out_ptr, stride_h, stride_d, BLOCK: tl.constexpr):
    """``out [BLOCK, BLOCK]`` = ``head_offsets`` of heads and dims ``[0, BLOCK)``."""
    local = tl.arange(0, BLOCK)
    tl.store(out_ptr + local[:, None] * BLOCK + local[None, :],
             head_offsets(local[:, None], stride_h, local[None, :], stride_d))


def test_head_offsets_do_not_wrap_past_2_31():
    """A ``[B, H, T, D]`` tensor's head stride is ``T * D``: at 1M tokens x 128 (2^27, an int32 argument) head 16
    starts at 2^31, where an int32 product wraps."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the interpreter runs CPU tensors only
    stride_h = 2**20 * 128
    out = torch.zeros(32, 32, dtype=torch.int64, device=device)
    head_offsets_kernel[(1,)](out, stride_h, 1, BLOCK=32)
    expected = torch.arange(32)[:, None] * stride_h + torch.arange(32)[None, :]
    assert expected.max() >= 2**31  # the case is one an int32 product would get wrong
    assert torch.equal(out.cpu(), expected)


def test_no_rotary_dims_is_the_identity():
    """A layer that does not rotate (SmolLM3's NoPE layers: zero frequencies) passes every dim through."""
    x = heads(1, 2, 4, 8, seed=6)
    for backend in ("ref", "triton"):
        assert torch.equal(rope(x, torch.arange(4), torch.zeros(0), backend=backend), x)


@pytest.mark.parametrize(
    "change,message",
    [({"freqs": inv_freq(20)}, r"rotary dim 20 \(2 \* len\(inv_freq\)\) exceeds q's head dim 16"),
     ({"freqs": inv_freq(16)[None]}, r"inv_freq must be a 1-D floating-point tensor \[R/2\]"),
     ({"style": "neox"}, r"style='neox' is not one of half, interleaved"),
     ({"q": torch.ones(2, 4, 9, 16, dtype=torch.int64)}, r"q must be a floating-point tensor, got torch.int64"),
     ({"q": torch.randn(4, 9, 16)}, r"q must be \[B, heads, T, head_dim\], got shape \(4, 9, 16\)"),
     ({"k": torch.randn(2, 2, 8, 16)}, r"q \(2, 4, 9, 16\) and k \(2, 2, 8, 16\) must share batch and length"),
     ({"pos": torch.arange(8)}, r"positions must be \[T\], \[1, T\] or \[B, T\] = \[2, 9\], got shape \(8,\)"),
     ({"pos": torch.ones(3, 9, dtype=torch.long)}, r"positions must be .* got shape \(3, 9\)"),
     ({"pos": torch.ones(9, dtype=torch.bool)}, r"positions must be integer or floating-point, got torch.bool")],
)
@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_bad_input_is_named(change, message, backend):
    args = {"q": torch.randn(2, 4, 9, 16), "k": torch.randn(2, 2, 9, 16), "pos": torch.arange(9),
            "freqs": inv_freq(16), "style": "half"}
    args.update(change)
    error = ConfigError if "style" in change else LceError
    with pytest.raises(error, match=message):
        apply_rope(args["q"], args["k"], args["pos"], args["freqs"], style=args["style"], backend=backend)


def test_auto_takes_the_reference_for_float64(monkeypatch):
    """On CUDA ``auto`` resolves to Triton, which does not take float64: the op runs the reference there."""
    monkeypatch.delenv("LCE_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "resolve_backend", lambda backend, *tensors: "triton")  # as on a CUDA device
    x, pos = heads(1, 2, 5, 8, seed=7, dtype=torch.float64), torch.arange(5)
    assert torch.equal(rope(x, pos, inv_freq(8)), rope_reference(x, pos, inv_freq(8)))


def test_triton_refuses_float64():
    with pytest.raises(LceError, match=r"triton backend takes float16, bfloat16 or float32 tensors, got torch.float64"):
        rope(torch.randn(1, 1, 2, 4, dtype=torch.float64), torch.arange(2), inv_freq(4), backend="triton")
