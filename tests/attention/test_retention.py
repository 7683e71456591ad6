"""Retention: the paper's decays (golden values), and the parallel formula ``GroupNorm((Q Kᵀ ⊙ D) V)`` (eq. 5, 8) and
the recurrence ``S_n = γ S_{n-1} + K_nᵀ V_n`` (eq. 6) written out independently, against the kernel's forms."""

import pytest
import torch
import torch.nn.functional as F

from lce.attention import ATTENTIONS
from lce.attention.retention import retention_log_decays
from tests.attention.test_linear import attend, qkv


def test_paper_decays():
    gammas = retention_log_decays(4).exp()
    torch.testing.assert_close(gammas, torch.tensor([0.96875, 0.984375, 0.9921875, 0.99609375], dtype=torch.float64))
    assert retention_log_decays(32).exp()[-1] < 1  # 1 - 2^-36: kept in fp64 (log), 1.0 in fp32
    spread = retention_log_decays(5, "linspace").exp()
    torch.testing.assert_close(spread[[0, -1]], torch.tensor([1 - 1 / 32, 1 - 1 / 512], dtype=torch.float64))


def paper_retention(q, k, v, gammas, scaling):
    """RetNet eq. 5 with D_nm = γ^(n-m), then GroupNorm with one group per head (eq. 8), ``[B, T, H, D]``."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    n = torch.arange(q.shape[2], dtype=torch.float64)
    distance = n[:, None] - n[None, :]
    decay = torch.where(distance >= 0, gammas[:, None, None] ** distance.clamp(min=0), 0.0)  # [H, T, T]
    out = ((q @ k.transpose(-1, -2)) * scaling * decay) @ v  # [B, H, T, D]
    batch, heads, length, dim = out.shape
    normed = F.group_norm(out.transpose(1, 2).reshape(batch * length, heads * dim), heads, eps=1e-6)
    return normed.reshape(batch, length, heads, dim)


def paper_recurrence(q, k, v, gammas, scaling):
    """RetNet eq. 6 token by token, then RMSNorm per head (torchscale's choice), ``[B, T, H, D]``."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    state = torch.zeros(*q.shape[:2], q.shape[-1], v.shape[-1], dtype=q.dtype)
    outs = []
    for t in range(q.shape[2]):
        state = gammas[None, :, None, None] * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(scaling * (q[:, :, t, None, :] @ state).squeeze(-2))
    return F.rms_norm(torch.stack(outs, 1), (v.shape[-1],), eps=1e-6)


@pytest.mark.parametrize("form", ["chunked", "parallel", "recurrent"])
def test_forms_equal_the_paper(form):
    q, k, v = qkv(2, 4, 2, 23, 8)
    gammas = retention_log_decays(4).exp()
    config = ATTENTIONS.build({"name": "retention", "form": form, "chunk_size": 6})
    torch.testing.assert_close(attend(config, q, k, v), paper_retention(q, k, v, gammas, 8 ** -0.5))
    rms = ATTENTIONS.build({"name": "retention", "form": form, "chunk_size": 6, "norm": "rmsnorm"})
    torch.testing.assert_close(attend(rms, q, k, v), paper_recurrence(q, k, v, gammas, 8 ** -0.5))


def test_linspace_decays_reach_the_kernel():
    q, k, v = qkv(1, 4, 4, 17, 8)
    gammas = retention_log_decays(4, "linspace").exp()
    config = ATTENTIONS.build({"name": "retention", "decay": "linspace", "chunk_size": 4})
    torch.testing.assert_close(attend(config, q, k, v), paper_retention(q, k, v, gammas, 8 ** -0.5))
