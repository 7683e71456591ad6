"""TransNormer's NormAttention: a norm of the unnormalised linear attention, checked against torch's own norms on the
materialised scores; the output is invariant to the scale of the values (what the norm replaces the denominator for)."""

import pytest
import torch
import torch.nn.functional as F

from lce.attention import ATTENTIONS
from tests.attention.test_linear import attend, qkv


def reference(q, k, v, feature_map, norm, per_head):
    """``Norm((φ(Q) φ(K)ᵀ ⊙ M) V)`` with torch's norms (no affine), ``[B, T, H, D]``."""
    phi = {"elu_plus_one": lambda x: F.elu(x) + 1, "relu": F.relu, "identity": lambda x: x}[feature_map]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = ((phi(q) @ phi(k).transpose(-1, -2)).tril() @ v).transpose(1, 2)  # [B, T, H, D]
    shape = out.shape[-1:] if per_head else out.shape[-2:]
    if norm == "layernorm":
        return F.layer_norm(out, shape, eps=1e-6)
    return F.rms_norm(out, shape, eps=1e-6)


@pytest.mark.parametrize("feature_map", ["elu_plus_one", "relu", "identity"])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("per_head", [True, False])
def test_matches_torch_norms_on_the_materialised_scores(feature_map, norm, per_head):
    q, k, v = qkv(2, 4, 2, 19, 8)
    config = ATTENTIONS.build({"name": "transnormer", "feature_map": feature_map, "norm": norm,
                               "per_head": per_head, "chunk_size": 5})
    torch.testing.assert_close(attend(config, q, k, v), reference(q, k, v, feature_map, norm, per_head))


def test_output_is_normalised_and_scale_free():
    q, k, v = (t.detach() for t in qkv(1, 4, 2, 13, 8))
    config = ATTENTIONS.build({"name": "transnormer", "chunk_size": 4})
    out = attend(config, q, k, v)
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(out.shape[:-1], dtype=out.dtype))  # unit RMS per head
    torch.testing.assert_close(attend(config, q, k, 100.0 * v), out)  # no denominator, and no scale left
