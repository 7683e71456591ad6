"""Scale-out by configuration: 2 CPU processes (gloo, conf/accelerate/cpu_ddp.yaml) reproduce one process with the
same global batch; the shipped accelerate configs parse (FSDP2: test_fsdp.py, DeepSpeed ZeRO-3: test_zero3.py)."""

import pytest
import torch
from safetensors.torch import load_file

from lce.train import train
from tests.conftest import make_tiny_llama
from tests.train.launched import ACCELERATE, BLOCKS, launch, losses, run_config


def test_two_gloo_processes_match_one_process(tmp_path):
    one = make_tiny_llama()
    train(one, BLOCKS, run_config(1), tmp_path / "one", progress=False)
    launch("cpu_ddp", tmp_path / "two")
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
    ("cpu_fsdp2", "FSDP", lambda c: c.use_cpu and c.num_processes == 2 and c.fsdp_config["fsdp_version"] == 2),
    ("deepspeed_zero3", "DEEPSPEED", lambda c: c.deepspeed_config["zero_stage"] == 3),
    ("cpu_deepspeed_zero3", "DEEPSPEED", lambda c: c.use_cpu and c.num_processes == 2
     and c.deepspeed_config["zero_stage"] == 3),
])
def test_accelerate_configs_parse(name, kind, check):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(ACCELERATE / f"{name}.yaml"))
    assert config.distributed_type.value == kind and check(config)
