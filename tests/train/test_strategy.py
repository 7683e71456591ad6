"""Training strategies (lce.train.strategy): each launch gets its strategy from the registry, chosen once from what
``accelerate launch`` put into the environment; a launch lce does not run is a one-line ConfigError."""

import dataclasses
import importlib.util
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from lce.errors import ConfigError
from lce.train import TrainConfig, train
from lce.train.fsdp import FsdpSettings
from lce.train.loop import fresh_accelerator
from lce.train.strategy import STRATEGIES, DataParallel, Fsdp2, SingleProcess, Zero3, launch_strategy, select_strategy
from lce.train.zero3 import Zero3Settings
from tests.conftest import make_tiny_llama

CFG = TrainConfig(steps=1, seq_len=16, micro_batch_size=2, warmup_steps=0, val_every=0, loss_chunk_size=24,
                  mixed_precision="no")
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install 'deepspeed>=0.19.8')")
FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}
DEEPSPEED = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    """A process that ``accelerate launch`` did not start: no DeepSpeed or FSDP in the environment."""
    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)


def launched(monkeypatch, env: dict[str, str], num_processes: int = 2, mixed_precision: str = "no"):
    """The accelerator (as far as the selection reads it) of a process that ``accelerate launch`` started on CPUs
    with ``env``; accelerate itself turns every such launch into gloo data parallelism (``MULTI_CPU``)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    distributed_type = DistributedType.MULTI_CPU if num_processes > 1 else DistributedType.NO
    return SimpleNamespace(distributed_type=distributed_type, num_processes=num_processes,
                           mixed_precision=mixed_precision)


def test_the_registry_holds_each_strategy_under_its_name():
    assert STRATEGIES == {"single_process": SingleProcess, "ddp": DataParallel, "fsdp2": Fsdp2, "zero3": Zero3}
    assert all(name == cls.name for name, cls in STRATEGIES.items())


@pytest.mark.parametrize("env,num_processes,expected,settings", [
    pytest.param({}, 1, SingleProcess, None, id="one-process"),
    pytest.param({}, 2, DataParallel, None, id="ddp"),
    pytest.param(FSDP, 2, Fsdp2, FsdpSettings(), id="fsdp2"),
    pytest.param(DEEPSPEED, 2, Zero3, Zero3Settings(), marks=needs_deepspeed, id="zero3"),
])
def test_each_launch_gets_its_strategy(monkeypatch, env, num_processes, expected, settings):
    accelerator = launched(monkeypatch, env, num_processes)
    assert launch_strategy(accelerator) == (expected.name, settings)
    strategy = select_strategy(accelerator, CFG)
    assert type(strategy) is expected
    assert strategy.accelerator is accelerator and strategy.cfg is CFG and strategy.settings == settings


def test_one_process_trains_the_callers_model_in_place():
    strategy = select_strategy(fresh_accelerator(CFG, "cpu"), CFG)
    assert type(strategy) is SingleProcess
    model = make_tiny_llama()
    strategy.prepare(model)
    assert strategy.trained is model and strategy.loss_module.model is model
    # The optimizer state a checkpoint stores is keyed by parameter name, whatever the strategy.
    assert {group["weight_decay"] for group in strategy.optimizer_state()["param_groups"]} == {CFG.weight_decay, 0.0}


@pytest.mark.parametrize("env,mixed_precision,message", [
    pytest.param({**FSDP, **DEEPSPEED}, "no", r"^accelerate launch config: asks for both DeepSpeed "
                 r"\(ACCELERATE_USE_DEEPSPEED\) and FSDP \(ACCELERATE_USE_FSDP\); launch with one of conf/accelerate/",
                 marks=needs_deepspeed, id="deepspeed-and-fsdp"),
    pytest.param(FSDP, "fp16", r"^accelerate FSDP launch config: train.mixed_precision=fp16 needs a sharded gradient "
                 "scaler", id="fsdp-fp16"),
    pytest.param({**FSDP, "FSDP_VERSION": "1"}, "no", r"^accelerate FSDP launch config: fsdp_version is 1",
                 id="fsdp1"),
    pytest.param(DEEPSPEED, "fp16", r"^accelerate DeepSpeed launch config: train.mixed_precision=fp16 needs "
                 "DeepSpeed's loss scaler", marks=needs_deepspeed, id="zero3-fp16"),
    pytest.param({**DEEPSPEED, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "no",
                 r"^accelerate DeepSpeed launch config: zero_stage is 2", marks=needs_deepspeed, id="zero-stage-2"),
])
def test_a_launch_lce_does_not_run_is_a_one_line_error(monkeypatch, env, mixed_precision, message):
    with pytest.raises(ConfigError, match=message) as raised:
        select_strategy(launched(monkeypatch, env, mixed_precision=mixed_precision), CFG)
    assert "\n" not in str(raised.value)


@needs_deepspeed
def test_a_bad_launch_fails_before_training_touches_the_model(monkeypatch, tmp_path):
    launched(monkeypatch, DEEPSPEED, num_processes=1)
    model = make_tiny_llama()
    names = set(model.state_dict())
    with pytest.raises(ConfigError, match="fp16 needs DeepSpeed's loss scaler"):
        train(model, torch.randint(2, 259, (4, 17)), dataclasses.replace(CFG, mixed_precision="fp16", lora_rank=4),
              tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    assert set(model.state_dict()) == names  # no LoRA adapters were added
