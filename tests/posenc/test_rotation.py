"""``Rotation`` reproduces the model's own rotary embedding at any positions."""

import torch

from lce.hf.adapters import adapter_for
from lce.posenc.rotation import Rotation
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
