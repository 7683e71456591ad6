"""Log-n scaling: golden values, identity within the training length, composition, decode == full forward."""

import math

import pytest
import torch

import lce
from lce.errors import ConfigError
from lce.posenc.logn import logn_scale
from tests.conftest import assert_decode_matches_full, logits, make_tiny_llama, scale_queries


def test_golden_values():
    """Qwen-1's table: logn_list[p] = log(p+1, L) if p+1 > L else 1 (L = 2048)."""
    positions = [0, 2046, 2047, 2048, 4095, 8191, 32767]
    scale = logn_scale(2048)(torch.tensor([positions]))
    expected = [math.log(p + 1, 2048) if p + 1 > 2048 else 1.0 for p in positions]
    assert expected[3] > 1 and expected[2] == 1
    torch.testing.assert_close(scale[0], torch.tensor(expected, dtype=torch.float32))
    assert scale[0, 4].item() == pytest.approx(12 / 11)


def test_identity_within_training_length():
    model, reference = make_tiny_llama(), make_tiny_llama()  # max_position_embeddings 64
    lce.patch(model, "logn")
    ids = torch.randint(3, 259, (2, 64), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(model, ids), logits(reference, ids))


def test_beyond_training_length_equals_scaled_queries():
    """Reference: eager attention with q multiplied by the log-n factor, via a forward hook on q_proj (RoPE is
    linear, so scaling before or after rotation is the same)."""
    model, reference = make_tiny_llama(max_position_embeddings=16), make_tiny_llama(max_position_embeddings=16)
    lce.patch(model, "logn")
    ids = torch.randint(3, 259, (1, 40), generator=torch.Generator().manual_seed(1))
    factor = logn_scale(16)(torch.arange(40)[None])[0]
    scale_queries(reference, factor)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)  # fp32 order
    assert not torch.allclose(logits(model, ids), logits(make_tiny_llama(max_position_embeddings=16), ids))


def test_composes_with_nope_and_decodes_like_full_forward():
    model = make_tiny_llama(max_position_embeddings=8)
    lce.patch(model, "nope", logn=True)
    assert model.config._attn_implementation == "lce_logn"
    ids = torch.randint(3, 259, (1, 30), generator=torch.Generator().manual_seed(2))
    assert_decode_matches_full(model, ids, prefill=20)
    lce.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model.model.layers[0].self_attn, "lce_plan")


def test_save_load_round_trip(tmp_path):
    model = make_tiny_llama(max_position_embeddings=8)
    lce.patch(model, "logn", logn_length=6)
    lce.save_model(model, lce.data.ByteTokenizer(), tmp_path)
    loaded, _ = lce.load_model(str(tmp_path))
    ids = torch.randint(3, 259, (1, 20))
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_bad_parameters():
    with pytest.raises(ConfigError, match=r"posenc\.logn_length: must be >= 2"):
        lce.patch(make_tiny_llama(), "rope", logn=True, logn_length=1)
    with pytest.raises(ConfigError, match=r"posenc\.logn: posenc=logn with logn=false is plain RoPE"):
        lce.patch(make_tiny_llama(), "logn", logn=False)
