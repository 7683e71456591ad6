"""The training device (lce.train.device, train(device=...)): what is asked for is what accelerate trains on, and a
device this machine lacks is a one-line ConfigError before anything runs. CUDA is faked where the machine has none:
the checks only read ``torch.cuda.is_available`` and ``device_count``."""

import dataclasses

import pytest
import torch

from lce.errors import ConfigError
from lce.train import TrainConfig, train
from lce.train import loop as loop_module
from lce.train.device import accelerator_cpu, check_device, claimed_device
from lce.train.loop import fresh_accelerator, resolve_mixed_precision
from tests.conftest import make_tiny_llama

CFG = TrainConfig(steps=1, seq_len=16, micro_batch_size=2, warmup_steps=0, val_every=0, loss_chunk_size=24,
                  mixed_precision="no")
BLOCKS = torch.randint(2, 259, (4, 17), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA devices, as far as the checks can tell; records ``torch.cuda.set_device`` calls."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    return current


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.mark.parametrize("device", [None, "auto"])
def test_none_and_auto_leave_the_choice_to_accelerate(device):
    assert check_device(device) is None


@pytest.mark.parametrize("device, message", [
    pytest.param("cuda", r"^device: 'cuda' but CUDA is not available \(torch .*\); available: cpu$", id="cuda"),
    pytest.param("cuda:1", r"^device: 'cuda:1' but CUDA is not available", id="cuda-1"),
    pytest.param("mps", r"^device: 'mps': lce trains on cpu or cuda only; available: cpu$", id="mps"),
    pytest.param("gpu", r"^device: 'gpu' is not a torch device .*; available: cpu$", id="not-a-device"),
])
def test_missing_devices_are_config_errors(no_cuda, device, message):
    with pytest.raises(ConfigError, match=message):
        check_device(device)


def test_cuda_indices_are_checked_against_the_gpus(two_gpus):
    assert check_device("cuda:1") == torch.device("cuda", 1)
    assert check_device(torch.device("cuda")) == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"^device: 'cuda:3' does not exist; available: cpu, cuda, cuda:0, cuda:1$"):
        check_device("cuda:3")


def test_a_launched_process_trains_on_its_local_rank_gpu(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert check_device("cuda:1") == torch.device("cuda", 1) and check_device("cuda") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"^device: 'cuda:0' in the process of LOCAL_RANK 1 .*cuda:1 here"):
        check_device("cuda:0")
    assert accelerator_cpu(torch.device("cuda", 1)) is False and two_gpus == []  # accelerate takes LOCAL_RANK's


def test_one_process_on_cuda_n_makes_it_the_current_device(two_gpus):
    assert accelerator_cpu(torch.device("cuda", 1)) is False
    assert two_gpus == [torch.device("cuda", 1)]


def test_cpu_is_asked_of_accelerate_even_with_cuda(two_gpus):
    assert accelerator_cpu(torch.device("cpu")) is True
    assert accelerator_cpu(None) is False  # accelerate's choice: the GPU


def test_fresh_accelerator_on_cpu_with_cuda_available(two_gpus, monkeypatch):
    made = []

    def accelerator(**kwargs):
        made.append(kwargs)
        return real(**kwargs)

    real = loop_module.Accelerator
    monkeypatch.setattr(loop_module, "Accelerator", accelerator)
    assert fresh_accelerator(dataclasses.replace(CFG, mixed_precision="auto"), "cpu").device == torch.device("cpu")
    assert made[-1]["cpu"] is True and made[-1]["mixed_precision"] == "no"  # auto is bf16 on CUDA only


def test_auto_mixed_precision_follows_the_training_device(two_gpus):
    assert resolve_mixed_precision("auto", None) == "bf16"  # accelerate's choice: the GPU
    assert resolve_mixed_precision("auto", torch.device("cuda", 1)) == "bf16"
    assert resolve_mixed_precision("auto", torch.device("cpu")) == "no"
    assert resolve_mixed_precision("bf16", torch.device("cpu")) == "bf16"  # asked for explicitly


def test_a_device_other_than_accelerates_is_an_error():
    with pytest.raises(ConfigError, match=r"^device: 'cuda:1' was requested but accelerate set up 'cpu'"):
        claimed_device(torch.device("cuda", 1), torch.device("cpu"))
    assert claimed_device(torch.device("cpu"), torch.device("cpu")) == torch.device("cpu")


def test_train_on_cpu(tmp_path):
    model = make_tiny_llama()
    result = train(model, BLOCKS, CFG, tmp_path, progress=False, device="cpu")
    assert result.device == torch.device("cpu")
    assert all(p.device == torch.device("cpu") for p in model.parameters())


def test_train_on_missing_cuda_fails_before_anything_runs(no_cuda, tmp_path):
    with pytest.raises(ConfigError, match=r"^device: 'cuda' but CUDA is not available"):
        train(make_tiny_llama(), BLOCKS, CFG, tmp_path / "run", progress=False, device="cuda")
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_on_the_last_gpu(tmp_path):
    last = torch.device("cuda", torch.cuda.device_count() - 1)
    model = make_tiny_llama()
    result = train(model, BLOCKS, dataclasses.replace(CFG, mixed_precision="auto"), tmp_path, progress=False,
                   device=last)
    assert result.device == last and all(p.device == last for p in model.parameters())
    assert torch.cuda.max_memory_allocated(last) > 0
