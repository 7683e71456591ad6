"""FSDP2 (lce.train.fsdp) in 2 CPU processes over gloo (conf/accelerate/cpu_fsdp2.yaml): the losses of one process
with the same global batch, with gradient accumulation, clipping and validation under sharding, in bf16 and with LoRA;
a killed run resumes exactly; checkpoints move between FSDP2 and one process; non-finite steps are skipped as in one
process; launch settings lce does not honour are clear errors."""

import shutil
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from lce.errors import ConfigError
from lce.train import latest_checkpoint, load_checkpoint, train
from lce.train.checkpoint import checkpoint_dir
from lce.train.fsdp import FsdpSettings, fsdp_settings, shard
from tests.conftest import make_tiny_llama
from tests.train.launched import (
    ACCELERATE,
    BLOCKS,
    SHARDED_RUN,
    VAL_BLOCKS,
    assert_nonfinite_run_matches_one_process,
    final_weights,
    launch,
    read_log,
    run_config,
)

RUN = SHARDED_RUN


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """An uninterrupted 2-process FSDP2 run (checkpoints at steps 2 and 4)."""
    run = tmp_path_factory.mktemp("fsdp") / "run"
    launch("cpu_fsdp2", run, val_blocks=VAL_BLOCKS, **RUN)
    return run


def test_two_fsdp2_processes_match_one_process(fsdp_run, one_process):
    one_run, one_model = one_process
    sharded, reference = read_log(fsdp_run), read_log(one_run)
    assert all(r["grad_norm"] > RUN["grad_clip"] for r in sharded)
    # Each process computes half of a step's micro-batches; FSDP2 reduce-scatters (averages) the gradients and AdamW
    # steps on shards. Only the order of fp32 sums differs, a few ulps of losses ~5 (measured: <= 6e-8 absolute).
    assert [r["loss"] for r in sharded] == pytest.approx([r["loss"] for r in reference], rel=1e-6)
    # The norm is summed over shards, then over processes: again a different order of fp32 sums (measured 1.2e-7).
    assert [r["grad_norm"] for r in sharded] == pytest.approx([r["grad_norm"] for r in reference], rel=1e-6)
    assert [r["tokens"] for r in sharded] == [r["tokens"] for r in reference]
    validated = [r["val_loss"] for r in sharded if "val_loss" in r]
    assert len(validated) == 2 and validated == pytest.approx([r["val_loss"] for r in reference if "val_loss" in r],
                                                              rel=1e-6)  # as the losses
    for name, value in final_weights(fsdp_run).items():
        # 4 Adam steps of lr 3e-3 amplify those ulps at most to ~1e-6 per weight (measured 3e-7).
        torch.testing.assert_close(value, one_model.state_dict()[name], atol=1e-5, rtol=0, msg=name)


def test_fsdp2_checkpoint_is_the_full_state_by_name(fsdp_run, one_process):
    one_run, _ = one_process
    plain = make_tiny_llama(seed=1)
    load_checkpoint(checkpoint_dir(fsdp_run, 4), plain, restore_rng=False)
    for name, value in final_weights(fsdp_run).items():
        assert torch.equal(value, plain.state_dict()[name]), name
    sharded, reference = (load_file(checkpoint_dir(run, 4) / "optimizer.safetensors") for run in (fsdp_run, one_run))
    assert sharded.keys() == reference.keys()
    for key, value in sharded.items():
        # AdamW moments after 4 steps carry the same few-ulp gradient differences as the weights. Relative to each
        # tensor's largest entry (the second moments are ~1e-5): measured 1e-6 (exp_avg) and 4e-7 (exp_avg_sq).
        assert (value - reference[key]).abs().max() <= 1e-5 * reference[key].abs().max(), key


def test_killed_fsdp2_run_resumes_exactly(fsdp_run, tmp_path):
    killed = launch("cpu_fsdp2", tmp_path, kill_at=3, val_blocks=VAL_BLOCKS, **{**RUN, "checkpoint_every": 1})
    assert killed.returncode != 0 and "killed at step 3" in killed.stderr
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 2)
    launch("cpu_fsdp2", tmp_path, val_blocks=VAL_BLOCKS, **{**RUN, "checkpoint_every": 1})
    resumed, uninterrupted = read_log(tmp_path), read_log(fsdp_run)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "tokens", "val_loss"):  # same processes, same sums in the same order: bit for bit
        assert [r.get(key) for r in resumed] == [r.get(key) for r in uninterrupted], key
    for name, value in final_weights(tmp_path).items():
        assert torch.equal(value, final_weights(fsdp_run)[name]), name


def test_fsdp2_checkpoint_resumes_in_one_process(fsdp_run, one_process, tmp_path):
    one_run, _ = one_process
    shutil.copytree(checkpoint_dir(fsdp_run, 2), checkpoint_dir(tmp_path, 2))
    model = make_tiny_llama(seed=1)  # everything must come from the checkpoint
    result = train(model, BLOCKS, run_config(1, **RUN), tmp_path, val_blocks=BLOCKS[:VAL_BLOCKS], progress=False)
    assert result.resumed_from == 2
    continued = read_log(tmp_path)  # the log of steps 3 and 4 only: steps 1 and 2 ran in another directory
    # As in test_two_fsdp2_processes_match_one_process: fp32 sums in another order before step 2.
    assert [r["loss"] for r in continued] == pytest.approx([r["loss"] for r in read_log(one_run)[2:]], rel=1e-6)
    assert [r["tokens"] for r in continued] == [r["tokens"] for r in read_log(one_run)[2:]]


@pytest.mark.slow
def test_one_process_checkpoint_resumes_under_fsdp2(fsdp_run, one_process, tmp_path):
    one_run, _ = one_process
    shutil.copytree(checkpoint_dir(one_run, 2), checkpoint_dir(tmp_path, 2))
    launch("cpu_fsdp2", tmp_path, val_blocks=VAL_BLOCKS, **RUN)
    continued = read_log(tmp_path)
    # As in test_two_fsdp2_processes_match_one_process.
    assert [r["loss"] for r in continued] == pytest.approx([r["loss"] for r in read_log(fsdp_run)[2:]], rel=1e-6)
    for name, value in final_weights(tmp_path).items():
        torch.testing.assert_close(value, final_weights(fsdp_run)[name], atol=1e-5, rtol=0, msg=name)


def test_bf16_computes_in_bf16_like_one_process(fsdp_run, tmp_path):
    bf16 = {**RUN, "mixed_precision": "bf16"}
    launch("cpu_fsdp2", tmp_path / "fsdp", val_blocks=VAL_BLOCKS, **bf16)
    train(make_tiny_llama(), BLOCKS, run_config(1, **bf16), tmp_path / "one", val_blocks=BLOCKS[:VAL_BLOCKS],
          progress=False)
    sharded, reference = (read_log(tmp_path / run) for run in ("fsdp", "one"))
    assert [r["loss"] for r in sharded] != [r["loss"] for r in read_log(fsdp_run)]  # not the float32 run
    # FSDP2 casts every gathered weight to bf16 (norms included) where one process's autocast keeps norms and the
    # loss in float32: the runs differ by bf16 rounding (2^-9 relative per operation), averaged over 128 tokens
    # per step (measured 7e-5 relative after 4 steps).
    assert [r["loss"] for r in sharded] == pytest.approx([r["loss"] for r in reference], rel=1e-3)
    assert {value.dtype for value in final_weights(tmp_path / "fsdp").values()} == {torch.float32}  # master weights


def test_lora_with_activation_checkpointing_matches_one_process(tmp_path):
    lora = {**RUN, "lora_rank": 4, "trainable": ["embed", "norm"], "gradient_checkpointing": True}
    launch("cpu_fsdp2", tmp_path / "fsdp", val_blocks=VAL_BLOCKS, **lora)
    model = make_tiny_llama()
    train(model, BLOCKS, run_config(1, **lora), tmp_path / "one", val_blocks=BLOCKS[:VAL_BLOCKS], progress=False)
    sharded, reference = (read_log(tmp_path / run) for run in ("fsdp", "one"))
    # As in test_two_fsdp2_processes_match_one_process (measured 3e-8 and 2.5e-7 here).
    assert [r["loss"] for r in sharded] == pytest.approx([r["loss"] for r in reference], rel=1e-6)
    for name, value in final_weights(tmp_path / "fsdp").items():  # adapters merged into plain weights
        torch.testing.assert_close(value, model.state_dict()[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
def test_offloaded_parameters_train_alike(fsdp_run, tmp_path):
    config = tmp_path / "cpu_fsdp2_offload.yaml"
    config.write_text((ACCELERATE / "cpu_fsdp2.yaml").read_text().replace("fsdp_offload_params: false",
                                                                          "fsdp_offload_params: true"))
    launch(config, tmp_path / "run", val_blocks=VAL_BLOCKS, **RUN)
    # The same sums on the same (CPU) device: offloading only moves where shards live between steps.
    assert [r["loss"] for r in read_log(tmp_path / "run")] == [r["loss"] for r in read_log(fsdp_run)]


def cpu_launch(monkeypatch, **env):
    """What ``fsdp_settings`` sees in a process started by ``accelerate launch`` with an FSDP config and use_cpu."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for name, value in {"FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", **env}.items():
        monkeypatch.setenv(name, value)
    return SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)


def test_nonfinite_steps_are_skipped_under_fsdp2_as_in_one_process(tmp_path):
    assert_nonfinite_run_matches_one_process("cpu_fsdp2", tmp_path, grad_norm="nan")


def test_settings_follow_the_launch_config(monkeypatch):
    assert fsdp_settings(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), "no") is None  # plain DDP
    accelerator = cpu_launch(monkeypatch, FSDP_RESHARD_AFTER_FORWARD="false",
                             FSDP_TRANSFORMER_CLS_TO_WRAP="LlamaDecoderLayer")
    assert fsdp_settings(accelerator, "bf16") == FsdpSettings(
        reshard_after_forward=False, offload_params=False, param_dtype=torch.bfloat16,
        layer_classes=("LlamaDecoderLayer",))


@pytest.mark.parametrize("env,mixed_precision,message", [
    ({"FSDP_VERSION": "1"}, "no", "fsdp_version is 1; lce shards with FSDP2 only"),
    ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "no", "fsdp_auto_wrap_policy must be TRANSFORMER_BASED_WRAP"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "no", "use train.gradient_checkpointing=true"),
    ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "no", "fsdp_cpu_ram_efficient_loading must be false"),
    ({}, "fp16", "train.mixed_precision=fp16 needs a sharded gradient scaler"),
], ids=["fsdp1", "size-wrap", "fsdp-activation-checkpointing", "rank0-loading", "fp16"])
def test_unsupported_launch_settings_are_clear_errors(monkeypatch, env, mixed_precision, message):
    with pytest.raises(ConfigError, match=message):
        fsdp_settings(cpu_launch(monkeypatch, **env), mixed_precision)


def test_wrap_classes_must_be_the_models_decoder_layers():
    model = make_tiny_llama()
    with pytest.raises(ConfigError, match="fsdp_transformer_layer_cls_to_wrap is MistralDecoderLayer, but this "
                                          "model's decoder layers are LlamaDecoderLayer"):
        shard(model, list(model.model.layers), FsdpSettings(layer_classes=("MistralDecoderLayer",)))
