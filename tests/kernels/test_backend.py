"""Backend resolution: explicit choice > LCE_BACKEND > auto (Triton on CUDA, the reference elsewhere)."""

import pytest
import torch

from lce.errors import ConfigError, LceError
from lce.kernels.attention import AttentionSpec, flash_attention
from lce.kernels.backend import on_device_of, requested_backend, resolve_backend, use_backend
from lce.kernels.cross_entropy import LogitHead, linear_cross_entropy
from lce.kernels.linear_attention import linear_attention
from lce.kernels.rope import rope


def test_auto_is_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("LCE_BACKEND", raising=False)
    assert resolve_backend("auto", torch.zeros(1)) == "ref"
    assert resolve_backend(None, torch.zeros(1)) == "ref"


def test_environment_overrides_auto_but_not_an_explicit_choice(monkeypatch):
    monkeypatch.setenv("LCE_BACKEND", "triton")
    assert requested_backend("auto") == "triton"
    assert requested_backend("ref") == "ref"


def test_unknown_names_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="'trition'.*did you mean 'triton'"):
        requested_backend("trition")
    monkeypatch.setenv("LCE_BACKEND", "cuda")
    with pytest.raises(ConfigError, match="LCE_BACKEND='cuda'"):
        requested_backend(None)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(LceError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", torch.zeros(1)) == "triton"


def test_use_backend_sits_between_an_explicit_choice_and_the_environment(monkeypatch):
    monkeypatch.setenv("LCE_BACKEND", "triton")
    with use_backend("ref"):
        assert requested_backend(None) == "ref"
        assert requested_backend("triton") == "triton"
        with use_backend("auto"):  # auto defers to the environment
            assert requested_backend(None) == "triton"
    assert requested_backend(None) == "triton"
    with pytest.raises(ConfigError, match="'fast'"), use_backend("fast"):
        pass


def test_cpu_tensors_launch_without_a_device_guard():
    """The interpreter runs CPU tensors; entering the guard must not touch CUDA (there may be none)."""
    with on_device_of(torch.zeros(1)):
        pass


def _every_op(device: str) -> list[torch.Tensor]:
    """Each Triton op's outputs and input gradients on ``device`` (fixed seed, fp32)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 70, 32, generator=g).to(device).requires_grad_()
    pos = torch.arange(70, device=device)
    rotated = rope(x, pos, torch.rand(8, generator=g).to(device), backend="triton")
    attended = flash_attention(rotated, x[:, :1], x[:, :1], AttentionSpec(32 ** -0.5), pos[None], pos[None],
                               backend="triton")
    num, _, _ = linear_attention(x.sigmoid(), x.sigmoid(), x, -x[..., 0].sigmoid(), backend="triton")
    head = LogitHead(torch.randn(50, 32, generator=g).to(device).requires_grad_())
    nll = linear_cross_entropy(attended.flatten(0, 2), head, torch.randint(0, 50, (140,), generator=g).to(device),
                               backend="triton")
    loss = rotated.sum() + attended.sum() + num.sum() + nll.sum()
    return [rotated, attended, num, nll, *torch.autograd.grad(loss, (x, head.weight))]


@pytest.mark.gpu
def test_kernels_launch_on_their_tensors_device_not_the_current_one():
    """Triton launches on the current CUDA device: every op must switch to its tensors' device (a model split over
    GPUs runs layers on cuda:1 while cuda:0 is current). The same kernels on the same device must agree bit for bit
    with a run where cuda:1 is current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    with torch.cuda.device(1):
        expected = _every_op("cuda:1")
    with torch.cuda.device(0):
        got = _every_op("cuda:1")
        torch.cuda.synchronize(1)
    for out, ref in zip(got, expected):
        assert out.device == torch.device("cuda:1") and torch.equal(out, ref)
