"""DeepSpeed ZeRO-3 (lce.train.zero3) in 2 CPU processes over gloo (conf/accelerate/cpu_deepspeed_zero3.yaml): the
losses of one process with the same global batch, with gradient accumulation, clipping and validation, in bf16 and
with LoRA; a killed run resumes exactly (fp32 and bf16); checkpoints are lce's full state by name and move between
ZeRO-3 and one process; non-finite steps are skipped as in one process; launch settings lce does not honour are
clear errors; a run without DeepSpeed prints nothing of it."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from lce.errors import ConfigError
from lce.train import latest_checkpoint, load_checkpoint, train
from lce.train.checkpoint import checkpoint_dir
from lce.train.zero3 import Zero3Settings, zero3_settings
from tests.conftest import make_tiny_llama
from tests.train.launched import (
    BLOCKS,
    ROOT,
    SHARDED_RUN,
    VAL_BLOCKS,
    assert_nonfinite_run_matches_one_process,
    final_weights,
    launch,
    read_log,
    run_config,
)

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install 'deepspeed>=0.19.8')")

RUN = SHARDED_RUN


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    """An uninterrupted 2-process ZeRO-3 run (checkpoints at steps 2 and 4)."""
    run = tmp_path_factory.mktemp("zero3") / "run"
    launch("cpu_deepspeed_zero3", run, val_blocks=VAL_BLOCKS, **RUN)
    return run


@needs_deepspeed
def test_two_zero3_processes_match_one_process(zero3_run, one_process):
    one_run, one_model = one_process
    partitioned, reference = read_log(zero3_run), read_log(one_run)
    assert all(r["grad_norm"] > RUN["grad_clip"] for r in partitioned)
    # Each process computes half of a step's micro-batches; DeepSpeed averages the gradients into partitions, clips
    # by dividing where torch multiplies, and AdamW steps on flat fp32 partitions; under ZeRO-3's forward hooks the
    # loss takes the output layer through its forward (lce.hf.adapters.logit_head) instead of the fused head. Only
    # the order and form of fp32 operations differ, a few ulps of losses ~5 (measured <= 5e-9 relative).
    assert [r["loss"] for r in partitioned] == pytest.approx([r["loss"] for r in reference], rel=1e-6)
    # The norm summed over partitions, then over processes (measured 1.5e-7 relative).
    assert [r["grad_norm"] for r in partitioned] == pytest.approx([r["grad_norm"] for r in reference], rel=1e-6)
    assert [r["tokens"] for r in partitioned] == [r["tokens"] for r in reference]
    validated = [r["val_loss"] for r in partitioned if "val_loss" in r]
    assert len(validated) == 2 and validated == pytest.approx([r["val_loss"] for r in reference if "val_loss" in r],
                                                              rel=1e-6)  # as the losses
    for name, value in final_weights(zero3_run).items():
        # 4 Adam steps of lr 3e-3 amplify those ulps to lr-scale differences where a gradient element nearly cancels
        # (Adam divides it by its own magnitude): measured 3.6e-6 at most.
        torch.testing.assert_close(value, one_model.state_dict()[name], atol=1e-5, rtol=0, msg=name)


@needs_deepspeed
def test_zero3_checkpoint_is_the_full_state_by_name(zero3_run, one_process):
    one_run, _ = one_process
    plain = make_tiny_llama(seed=1)
    load_checkpoint(checkpoint_dir(zero3_run, 4), plain, restore_rng=False)
    for name, value in final_weights(zero3_run).items():
        assert torch.equal(value, plain.state_dict()[name]), name
    partitioned, reference = (load_file(checkpoint_dir(run, 4) / "optimizer.safetensors")
                              for run in (zero3_run, one_run))
    assert partitioned.keys() == reference.keys()
    assert all(partitioned[key].dtype == reference[key].dtype for key in reference)
    for key, value in partitioned.items():
        # The moments carry the gradient differences of weights that differ as in
        # test_two_zero3_processes_match_one_process: Adam divides each gradient by its own magnitude, so a few-ulp
        # error of a nearly cancelling gradient element moves its weight by up to ~lr x 1e-3, and the next gradients
        # follow. Relative to each tensor's largest entry: measured 1.0e-5 at most (layers.0.mlp.down_proj exp_avg;
        # FSDP2's order of sums happens to land closer, 1e-6). The step counters are equal.
        assert (value - reference[key]).abs().max() <= 5e-5 * reference[key].abs().max(), key


@needs_deepspeed
def test_killed_zero3_run_resumes_exactly(zero3_run, tmp_path):
    killed = launch("cpu_deepspeed_zero3", tmp_path, kill_at=3, val_blocks=VAL_BLOCKS,
                    **{**RUN, "checkpoint_every": 1})
    assert killed.returncode != 0 and "killed at step 3" in killed.stderr
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 2)
    launch("cpu_deepspeed_zero3", tmp_path, val_blocks=VAL_BLOCKS, **{**RUN, "checkpoint_every": 1})
    resumed, uninterrupted = read_log(tmp_path), read_log(zero3_run)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "tokens", "val_loss"):  # same processes, same sums in the same order: bit for bit
        assert [r.get(key) for r in resumed] == [r.get(key) for r in uninterrupted], key
    for name, value in final_weights(tmp_path).items():
        assert torch.equal(value, final_weights(zero3_run)[name]), name


@needs_deepspeed
def test_zero3_checkpoint_resumes_in_one_process(zero3_run, one_process, tmp_path):
    one_run, _ = one_process
    shutil.copytree(checkpoint_dir(zero3_run, 2), checkpoint_dir(tmp_path, 2))
    model = make_tiny_llama(seed=1)  # everything must come from the checkpoint
    result = train(model, BLOCKS, run_config(1, **RUN), tmp_path, val_blocks=BLOCKS[:VAL_BLOCKS], progress=False)
    assert result.resumed_from == 2
    continued = read_log(tmp_path)  # steps 3 and 4 only
    # As in test_two_zero3_processes_match_one_process: fp32 operations in another order before step 2.
    assert [r["loss"] for r in continued] == pytest.approx([r["loss"] for r in read_log(one_run)[2:]], rel=1e-6)


@pytest.mark.slow
@needs_deepspeed
def test_one_process_checkpoint_resumes_under_zero3(zero3_run, one_process, tmp_path):
    one_run, _ = one_process
    shutil.copytree(checkpoint_dir(one_run, 2), checkpoint_dir(tmp_path, 2))
    launch("cpu_deepspeed_zero3", tmp_path, val_blocks=VAL_BLOCKS, **RUN)
    continued = read_log(tmp_path)
    # As in test_two_zero3_processes_match_one_process.
    assert [r["loss"] for r in continued] == pytest.approx([r["loss"] for r in read_log(zero3_run)[2:]], rel=1e-6)
    for name, value in final_weights(tmp_path).items():
        torch.testing.assert_close(value, final_weights(zero3_run)[name], atol=1e-5, rtol=0, msg=name)


@needs_deepspeed
def test_bf16_computes_in_bf16_and_resumes_exactly(zero3_run, tmp_path):
    bf16 = {**RUN, "mixed_precision": "bf16", "checkpoint_every": 1}
    launch("cpu_deepspeed_zero3", tmp_path / "zero3", val_blocks=VAL_BLOCKS, **bf16)
    train(make_tiny_llama(), BLOCKS, run_config(1, **bf16), tmp_path / "one", val_blocks=BLOCKS[:VAL_BLOCKS],
          progress=False)
    partitioned, reference = (read_log(tmp_path / run) for run in ("zero3", "one"))
    assert [r["loss"] for r in partitioned] != [r["loss"] for r in read_log(zero3_run)]  # not the float32 run
    # DeepSpeed computes with bf16 weights (norms included) where one process's autocast keeps norms and the loss in
    # float32: the runs differ by bf16 rounding (2^-9 relative per operation), averaged over 128 tokens per step.
    assert [r["loss"] for r in partitioned] == pytest.approx([r["loss"] for r in reference], rel=1e-3)
    assert {value.dtype for value in final_weights(tmp_path / "zero3").values()} == {torch.float32}  # fp32 masters
    # The bf16 weights a resumed run computes with are rounded from the fp32 masters in the checkpoint, exactly as
    # they were after the step that wrote it.
    killed = launch("cpu_deepspeed_zero3", tmp_path / "killed", kill_at=3, val_blocks=VAL_BLOCKS, **bf16)
    assert killed.returncode != 0
    launch("cpu_deepspeed_zero3", tmp_path / "killed", val_blocks=VAL_BLOCKS, **bf16)
    resumed = read_log(tmp_path / "killed")
    for key in ("step", "loss", "grad_norm", "val_loss"):  # bit for bit
        assert [r.get(key) for r in resumed] == [r.get(key) for r in partitioned], key
    for name, value in final_weights(tmp_path / "killed").items():
        assert torch.equal(value, final_weights(tmp_path / "zero3")[name]), name


@needs_deepspeed
def test_lora_with_activation_checkpointing_matches_one_process(tmp_path):
    lora = {**RUN, "lora_rank": 4, "trainable": ["embed", "norm"], "gradient_checkpointing": True}
    launch("cpu_deepspeed_zero3", tmp_path / "zero3", val_blocks=VAL_BLOCKS, **lora)
    model = make_tiny_llama()
    train(model, BLOCKS, run_config(1, **lora), tmp_path / "one", val_blocks=BLOCKS[:VAL_BLOCKS], progress=False)
    partitioned, reference = (read_log(tmp_path / run) for run in ("zero3", "one"))
    # As in test_two_zero3_processes_match_one_process (measured 3e-9 and 2.5e-7 here).
    assert [r["loss"] for r in partitioned] == pytest.approx([r["loss"] for r in reference], rel=1e-6)
    for name, value in final_weights(tmp_path / "zero3").items():  # adapters merged into plain weights
        torch.testing.assert_close(value, model.state_dict()[name], atol=1e-5, rtol=0, msg=name)


def deepspeed_launch(monkeypatch, **env):
    """The environment ``accelerate launch`` gives a process with cpu_deepspeed_zero3.yaml, plus ``env``."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for name, value in {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", **env}.items():
        monkeypatch.setenv(name, value)


def test_settings_follow_the_launch_config(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert zero3_settings("no") is None
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed: test_missing_deepspeed_is_a_clear_error covers this launch")
    deepspeed_launch(monkeypatch)
    assert zero3_settings("bf16") == Zero3Settings(bf16=True)
    assert zero3_settings("no") == Zero3Settings(bf16=False)


def test_missing_deepspeed_is_a_clear_error(monkeypatch, tmp_path):
    deepspeed_launch(monkeypatch)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "deepspeed" else find_spec(name, *args))
    with pytest.raises(ConfigError, match="asks for DeepSpeed, but the deepspeed package is not installed"):
        train(make_tiny_llama(), BLOCKS, run_config(1, steps=1), tmp_path, progress=False)


@needs_deepspeed
@pytest.mark.parametrize("env,mixed_precision,message", [
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "no", "zero_stage is 2; lce runs ZeRO stage 3 only"),
    ({"ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}, "no", "deepspeed_config_file is set"),
    ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "no", "offload_optimizer_device is cpu"),
    ({"ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}, "no", "zero3_init_flag must be false"),
    ({"ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"}, "no", "zero3_save_16bit_model must be false"),
    ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, "no", "gradient_accumulation_steps is 4; leave it out"),
    ({"ACCELERATE_GRADIENT_CLIPPING": "1.0"}, "no", "gradient_clipping is 1.0; leave it out and set train.grad_clip"),
    ({}, "fp16", "train.mixed_precision=fp16 needs DeepSpeed's loss scaler"),
], ids=["stage2", "json-config", "offload", "zero3-init", "16bit-save", "grad-accum", "grad-clip", "fp16"])
def test_unsupported_launch_settings_are_clear_errors(monkeypatch, env, mixed_precision, message):
    deepspeed_launch(monkeypatch, **env)
    with pytest.raises(ConfigError, match=message):
        zero3_settings(mixed_precision)


@needs_deepspeed
def test_nonfinite_steps_are_skipped_under_zero3_as_in_one_process(tmp_path):
    # DeepSpeed skips the NaN steps itself (their gradient norm is not finite, reported as inf); lce stops after 2.
    assert_nonfinite_run_matches_one_process("cpu_deepspeed_zero3", tmp_path, grad_norm="inf")


# What DeepSpeed prints when it is imported: "Setting accelerator to CPU..." (real_accelerator.py) on a machine
# without one, "Setting ds_accelerator to ..." in older versions, its ops' "async_io ..." warnings.
DEEPSPEED_NOISE = re.compile(r"deepspeed|ds_accelerator|real_accelerator|setting accelerator|async_io", re.IGNORECASE)


@needs_deepspeed
def test_a_run_without_deepspeed_prints_nothing_of_it(tmp_path):
    # A tiny one-process run, then the save lce.experiment does next: transformers' save_pretrained unwraps the
    # model with accelerate, which imports deepspeed whenever it is installed.
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from lce.hf.models import save_model
        from lce.train import train
        from tests.conftest import make_tiny_llama
        from tests.train.launched import BLOCKS, run_config

        model = make_tiny_llama()
        train(model, BLOCKS, run_config(1, steps=1), {str(tmp_path / "run")!r}, progress=False)
        save_model(model, None, {str(tmp_path / "model")!r})
    """)
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}  # set by in-process runs
    done = subprocess.run([sys.executable, "-c", script], env={**env, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=300,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout + done.stderr  # deepspeed's logger writes to stdout
    assert not [line for line in printed.splitlines() if DEEPSPEED_NOISE.search(line)], printed
