"""Scale-out by configuration: 2 CPU processes (gloo, conf/accelerate/cpu_ddp.yaml) reproduce one process with the
same global batch; the shipped accelerate configs parse; DeepSpeed requested without the package is a clear error."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lce.errors import ConfigError
from lce.train import TrainConfig, train
from tests.conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = ROOT / "conf" / "accelerate"
BLOCKS = torch.randint(2, 259, (16, 17), generator=torch.Generator().manual_seed(0))
GLOBAL_MICRO_BATCHES = 2  # per optimizer step, over all processes


def per_process_config(num_processes: int) -> TrainConfig:
    """The same global batch (2 micro-batches of 2 blocks per step) split over ``num_processes`` processes."""
    return TrainConfig(steps=4, seq_len=16, micro_batch_size=2, grad_accum=GLOBAL_MICRO_BATCHES // num_processes,
                       lr=3e-3, warmup_steps=1, val_every=0, log_every=1, checkpoint_every=4, loss_chunk_size=24,
                       seed=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_two_gloo_processes_match_one_process(tmp_path):
    one = make_tiny_llama()
    train(one, BLOCKS, per_process_config(1), tmp_path / "one", progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "cpu_ddp.yaml"),
         "--main_process_port", str(free_port()), str(ROOT / "tests" / "train" / "ddp_worker.py"),
         str(tmp_path / "two")],
        check=True, env=env, cwd=ROOT, timeout=300, capture_output=True,
    )
    # Each rank computes half of the step's micro-batches; DDP averages the gradients as accumulation would. Only the
    # order of fp32 sums differs (all-reduce vs accumulation), a few ulps of values of size ~1-5.
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-6)
    final = load_file(tmp_path / "two" / "final.safetensors")
    for name, value in final.items():
        # 4 Adam steps of lr 3e-3 amplify those ulps at most to ~1e-6 per weight (Adam normalises the update).
        torch.testing.assert_close(value, one.state_dict()[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("name,kind,check", [
    ("ddp", "MULTI_GPU", lambda c: c.num_processes > 1),
    ("cpu_ddp", "MULTI_GPU", lambda c: c.use_cpu and c.num_processes == 2),  # torchrun-launched, gloo on CPU
    ("fsdp2", "FSDP", lambda c: c.fsdp_config["fsdp_version"] == 2),
    ("deepspeed_zero3", "DEEPSPEED", lambda c: c.deepspeed_config["zero_stage"] == 3),
])
def test_accelerate_configs_parse(name, kind, check):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ACCELERATE / f"{name}.yaml"))
    assert config.distributed_type.value == kind and check(config)


def test_deepspeed_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch sets for deepspeed_zero3.yaml
    with pytest.raises(ConfigError, match=r"asks for DeepSpeed \(ZeRO-3\), but the deepspeed package is not installed"):
        train(make_tiny_llama(), BLOCKS, dataclasses.replace(per_process_config(1), steps=1), tmp_path,
              progress=False)
