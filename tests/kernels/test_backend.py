"""Backend resolution: explicit choice > LCE_BACKEND > auto (Triton on CUDA, the reference elsewhere)."""

import pytest
import torch

from lce.errors import ConfigError, LceError
from lce.kernels.attention import AttentionSpec, flash_attention
from lce.kernels.backend import (
    interpreting,
    on_device_of,
    requested_backend,
    resolve_backend,
    triton_available,
    use_backend,
)
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
    # Import Triton (when present) under the session's flag first: Triton reads TRITON_INTERPRET when it defines its
    # own library functions (tl.min, ...), and a first import with the flag off would break the interpreter for every
    # later test in this process.
    triton_available()
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


def test_cpu_tensors_launch_without_a_device_guard(monkeypatch):
    """The interpreter runs CPU tensors; entering the guard must not touch CUDA (there may be none), and a Triton op
    (forward and backward, each launched inside its own guard) still runs inside it."""
    if not interpreting():
        pytest.skip("runs Triton on CPU tensors: needs TRITON_INTERPRET=1 (set by conftest without CUDA)")
    calls = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"torch.cuda.{name} called for CPU tensors")
        return call

    for name in ("device", "set_device", "current_device", "device_count", "is_available", "init", "_lazy_init",
                 "synchronize", "current_stream", "get_device_properties"):
        monkeypatch.setattr(torch.cuda, name, refuse(name))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 19, 16, generator=g).requires_grad_() for h in (2, 1, 1))  # [B, H, T, D], GQA
    pos = torch.arange(19)[None]
    spec = AttentionSpec(16 ** -0.5)
    with on_device_of(q):
        out = flash_attention(q, k, v, spec, pos, pos, backend="triton")
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert calls == []  # also the calls a library might have caught
    ref = flash_attention(q, k, v, spec, pos, pos, backend="ref")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


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
