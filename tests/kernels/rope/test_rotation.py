"""``Rotation``, the one rotation type, reproduces the model's own rotary embedding at any positions."""

import torch

from lce.hf.adapters import adapter_for
from lce.kernels.rope import Rotation
from tests.conftest import make_tiny_llama


def test_matches_transformers_apply_rotary():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = make_tiny_llama()
    rotary = model.model.rotary_emb
    rotation = adapter_for(model).rotation(rotary)
    x = torch.randn(2, 4, 9, 16)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [5, 9, 13, 100, 1000, 7, 3, 2, 1]])
    cos, sin = rotary(x, positions)
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert torch.equal(rotation.apply(x, positions), expected)


def test_relative_property_and_partial_rotary():
    """q.k after rotation depends only on the position difference; dims past rotary_dim pass through."""
    rotation = Rotation(1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8), style="interleaved")
    q, k = torch.randn(1, 1, 1, 12, dtype=torch.float64), torch.randn(1, 1, 1, 12, dtype=torch.float64)
    dot = lambda m, n: (rotation.apply(q, torch.tensor([[m]])) * rotation.apply(k, torch.tensor([[n]]))).sum()
    torch.testing.assert_close(dot(7, 3), dot(104, 100))
    assert torch.equal(rotation.apply(q, torch.tensor([[5]]))[..., 8:], q[..., 8:])


def test_attention_rotating_at_remapped_positions_runs_the_triton_kernel():
    """ReRoPE's attention rotates queries and keys at clipped positions through ``Rotation.apply``: on the fused Triton
    kernel (interpreted on CPU) its output and gradients equal the reference's. Tolerance: the kernel's cos/sin differ
    from torch's by an fp32 ulp (see tests/kernels/rope), which the logits and softmax carry as ~1e-7 differences on
    values of magnitude ~1: atol/rtol 1e-5."""
    from lce.kernels.backend import use_backend
    from lce.posenc.rerope import rerope_attention

    rotation = Rotation(1.0 / 10000 ** (torch.arange(0, 12, 2).float() / 12), attention_scaling=1.1)
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, heads, 11, 16, generator=g).requires_grad_() for heads in (4, 2, 2))
    positions = torch.arange(11).expand(2, 11)
    results = {}
    for backend in ("ref", "triton"):
        with use_backend(backend):  # the backward too: it recomputes checkpointed query blocks
            out = rerope_attention(query, key, value, rotation, positions, positions, 0.25, 4, block_size=4)
            results[backend] = (out, *torch.autograd.grad(out.square().sum(), (query, key)))
    torch.testing.assert_close(results["triton"], results["ref"], atol=1e-5, rtol=1e-5)


def test_the_kernel_specs_former_rotary_name_is_a_deprecated_alias():
    import pytest

    from lce.kernels import attention

    with pytest.warns(DeprecationWarning, match="lce.kernels.rope.Rotation"):
        assert attention.Rotary is Rotation


def test_a_layer_without_rotation_is_an_empty_rotation():
    """SmolLM3's NoPE layers: ``rotary_dim`` 0, and the rotation leaves every dim alone."""
    rotation = Rotation(torch.zeros(0))
    x = torch.randn(1, 2, 3, 8)
    assert rotation.rotary_dim == 0 and torch.equal(rotation.apply(x, torch.arange(3)[None]), x)


def test_apply_consecutive_equals_apply_at_the_mapped_positions_and_keeps_its_tables():
    """Bit for bit what ``apply`` gives at ``map(start, start + 1, ...)``, for maps of each kind; the cos/sin tables
    are computed once per (map, start, length, dtype) and at most TABLES_KEPT are kept."""
    from lce.kernels.attention.spec import IDENTITY, PositionMap
    from lce.kernels.rope import rotation as module

    rotation = Rotation(1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8), attention_scaling=1.0)
    x = torch.randn(2, 3, 11, 12, dtype=torch.bfloat16)
    maps = [IDENTITY, PositionMap(div=3, add=5), PositionMap(mod=4), PositionMap.constant(7), PositionMap.constant(0)]
    for position_map in maps:
        expected = rotation.apply(x, position_map(torch.arange(20, 31))[None].expand(2, -1))
        assert torch.equal(rotation.apply_consecutive(x, position_map, 20), expected), position_map
    assert len(rotation._tables) == len(maps)
    again = rotation.apply_consecutive(x, IDENTITY, 20)
    assert torch.equal(again, rotation.apply(x, torch.arange(20, 31))) and len(rotation._tables) == len(maps)
    for start in range(module.TABLES_KEPT + 3):
        rotation.apply_consecutive(x, IDENTITY, start)
    assert len(rotation._tables) == module.TABLES_KEPT
