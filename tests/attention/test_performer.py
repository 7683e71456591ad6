"""Performer (FAVOR+): reproducible fixed draws, redraws in training only, orthogonal features, an unbiased estimate
of softmax attention, and the running-maximum stabiliser (exact where plain fp32 exponentials underflow)."""

import math

import torch

import lce
from lce.attention import ATTENTIONS
from lce.attention.performer import (
    default_num_features,
    log_features,
    orthogonal_features,
)
from tests.attention.test_linear import attend, qkv
from tests.conftest import logits, make_tiny_llama

IDS = torch.randint(3, 259, (2, 19), generator=torch.Generator().manual_seed(0))


def performer_model(**params):
    return lce.patch(make_tiny_llama(), "rope", attention={"name": "performer", "num_features": 24, **params})


def omega(model, layer):
    return next(iter(model.model.layers[layer].self_attn.lce_plan.attention.memo.values()))


def test_fixed_draw_is_deterministic_per_seed():
    a, b, c = performer_model(seed=3), performer_model(seed=3), performer_model(seed=4)
    assert torch.equal(logits(a, IDS), logits(b, IDS))
    assert not torch.allclose(logits(a, IDS), logits(c, IDS))
    assert not torch.equal(omega(a, 0), omega(a, 1))  # each layer draws its own features
    torch.manual_seed(123)  # the global RNG plays no part in a fixed draw
    assert torch.equal(logits(performer_model(seed=3), IDS), logits(a, IDS))


def test_every_forward_redraws_in_training_only():
    model = performer_model(redraw="every_forward")
    model.train()
    with torch.no_grad():
        first, second = model(IDS).logits, model(IDS).logits
    assert not torch.allclose(first, second)
    model.eval()
    assert torch.equal(logits(model, IDS), logits(performer_model(), IDS))  # evaluation uses the fixed draw


def test_features_are_orthogonal_blocks_of_gaussian_lengths():
    features = orthogonal_features(40, 16, torch.Generator().manual_seed(0))
    assert features.shape == (40, 16)
    block = features[:16] / features[:16].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(16), atol=1e-5, rtol=0)
    many = orthogonal_features(65536, 16, torch.Generator().manual_seed(1))
    assert abs(many.norm(dim=1).pow(2).mean().item() - 16) < 0.3  # chi(16) lengths: E|w|^2 = d
    # Haar-distributed blocks: rows average to 0 (LAPACK's Q without the sign fix: 0.05).
    assert (many / many.norm(dim=1, keepdim=True)).mean(0).abs().max() < 0.02
    assert default_num_features(16) == 44 and default_num_features(64) == 266


def test_estimates_softmax_attention():
    """With many features the estimate approaches the model's softmax attention (of the same rotated q and k)."""
    q, k, v = (t.detach() * 0.5 for t in qkv(1, 2, 2, 24, 16, dtype=torch.float64))
    config = ATTENTIONS.build({"name": "performer", "num_features": 65536, "chunk_size": 8})
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    relative = (attend(config, q, k, v) - exact).norm() / exact.norm()
    few = attend(ATTENTIONS.build({"name": "performer", "num_features": 16}), q, k, v)
    # Relative error ~1/sqrt(m): 0.008 at m = 65536 (0.03 with biased orthogonal blocks), 0.29 at m = 16.
    assert relative < 0.02 and (few - exact).norm() / exact.norm() > 0.1


def test_stabiliser_is_exact_where_plain_exponentials_underflow():
    """Keys of large norm (common in pretrained models) have log-features below -100: fp32's exp flushes most keys'
    features to 0. The running-maximum stabiliser keeps them in range, and the fp32
    kernel equals the unstabilised estimate computed in fp64 (down to 1e-308)."""
    q, k, v = (t.detach() for t in qkv(1, 2, 2, 21, 16, dtype=torch.float64))
    k = k * 12.0
    config = ATTENTIONS.build({"name": "performer", "num_features": 32, "chunk_size": 4})
    out = attend(config, q.float(), k.float(), v.float())
    w = config.context(type("Kernel", (), {"memo": {}, "layer_index": 0})(), q, None)
    scale = math.sqrt(16 ** -0.5)
    fq, fk = log_features(q * scale, w).exp(), log_features(k * scale, w).exp()
    assert (fk.float() == 0).all(-1).float().mean() > 0.5 and (fk > 0).all()  # most keys vanish in fp32
    scores = (fq @ fk.transpose(-1, -2)).tril()
    plain = ((scores @ v) / scores.sum(-1, keepdim=True)).transpose(1, 2)
    torch.testing.assert_close(out.double(), plain, rtol=1e-4, atol=1e-5)  # fp32 kernel vs fp64 formula
