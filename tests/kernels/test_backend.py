"""Backend resolution: explicit choice > LCE_BACKEND > auto (Triton on CUDA, the reference elsewhere)."""

import pytest
import torch

from lce.errors import ConfigError, LceError
from lce.kernels.backend import requested_backend, resolve_backend, use_backend


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
