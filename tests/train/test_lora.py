"""LoRA / LoRA+ through peft: merged == unmerged, only the chosen weights train, exact resume, and a patched,
LoRA-fine-tuned, saved model reloads (in lce and in plain transformers) with its patch and its perplexity."""

import dataclasses
import json

import pytest
import torch
from peft.tuners.lora import LoraLayer

import lce
from lce.errors import ConfigError
from lce.train import TrainConfig, apply_lora, latest_checkpoint, merge_lora, train
from lce.train.lora import trainable_parameter_count
from tests.conftest import logits, make_tiny_llama
from tests.train.test_loop import Recorder, random_blocks, read_log

SEQ = 16
LORA = TrainConfig(
    steps=4, seq_len=SEQ, micro_batch_size=2, lr=1e-2, warmup_steps=0, checkpoint_every=2, log_every=1, val_every=0,
    loss_chunk_size=24, lora_rank=4, lora_alpha=8.0,
)


def test_merged_logits_equal_unmerged():
    model = make_tiny_llama()
    wrapped = apply_lora(model, LORA)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; give the adapters a real effect
            param.data.normal_(std=0.5)
    ids = torch.randint(2, 259, (2, 24))
    unmerged = logits(model, ids)
    assert (unmerged - logits(make_tiny_llama(), ids)).abs().max() > 0.1  # the adapters change the model
    merged = merge_lora(wrapped)
    assert merged is model and not any(isinstance(m, LoraLayer) for m in model.modules())
    # W0 x + s B(A x) vs (W0 + s BA) x: the same sums in another order; fp32 rounding of logits of size ~1.
    torch.testing.assert_close(logits(merged, ids), unmerged, atol=2e-5, rtol=2e-5)


def test_only_adapters_and_trainable_parameters_change(tmp_path):
    before = make_tiny_llama().state_dict()
    model = make_tiny_llama()
    train(model, random_blocks(8), dataclasses.replace(LORA, trainable=["embed", "norm"]), tmp_path, progress=False)
    after = model.state_dict()
    assert set(after) == set(before)  # merged back: the plain model's parameters, no adapters left
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    for name in before:
        expected = any(k in name for k in ("q_proj", "k_proj", "v_proj", "o_proj", "embed", "norm", "lm_head"))
        assert (name in changed) == expected, name  # lm_head is tied to embed_tokens


def test_lora_trains_few_parameters():
    model = make_tiny_llama()
    apply_lora(model, LORA)
    trainable, total = trainable_parameter_count(model)
    # r=4 on q,k,v,o of 2 layers: A [4, 64] and B [out, 4]; q,o out 64; k,v out 32 (GQA: 2 heads of 16).
    assert trainable == 2 * (4 * 4 * 64 + 4 * (64 + 32 + 32 + 64)) and trainable < total / 10


def test_lora_resume_repeats_the_uninterrupted_run(tmp_path):
    blocks = random_blocks(8)
    cfg = dataclasses.replace(LORA, checkpoint_every=1, trainable=["norm"])
    model_a = make_tiny_llama()
    train(model_a, blocks, cfg, tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(make_tiny_llama(), blocks, cfg, tmp_path / "b", logger=Recorder(kill_at=3), progress=False)
    assert latest_checkpoint(tmp_path / "b").name == "step_00000002"
    model_b = make_tiny_llama()
    train(model_b, blocks, cfg, tmp_path / "b", progress=False)
    losses = lambda run: [r["loss"] for r in read_log(tmp_path / run / "train_log.jsonl")]
    assert losses("b") == losses("a")
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


def test_patched_lora_model_saves_and_reloads_with_its_perplexity(tmp_path):
    from transformers import AutoModelForCausalLM

    from lce.data import ByteTokenizer
    from lce.eval.perplexity import score_documents

    model = lce.patch(make_tiny_llama(), "yarn", factor=4.0)
    train(model, random_blocks(8), dataclasses.replace(LORA, seq_len=SEQ, trainable=["embed", "norm"]), tmp_path,
          progress=False)
    lce.save_model(model, ByteTokenizer(), tmp_path / "model")

    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["lce"]["posenc"]["name"] == "yarn" and config["rope_parameters"]["rope_type"] == "yarn"
    assert not any("lora" in key or "peft" in key for key in config)
    reloaded, _ = lce.load_model(tmp_path / "model")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # built-in rope type: vanilla loads it too
    assert plain.config.rope_parameters["factor"] == 4.0

    docs = [torch.randint(2, 259, (200,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ppl = [score_documents(m, docs, 200).ppl for m in (model, reloaded, plain)]
    # Same weights, same rope parameters, same forward: identical up to fp32 summation order.
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-6) and ppl[2] == pytest.approx(ppl[0], rel=1e-6)


def test_lora_gradient_checkpointing_trains(tmp_path):
    model = make_tiny_llama()
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    cfg = dataclasses.replace(LORA, steps=2, gradient_checkpointing=True)
    result = train(model, random_blocks(8), cfg, tmp_path, progress=False)
    assert torch.isfinite(torch.tensor(result.final_loss))
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)  # adapters got gradients


def test_bad_lora_settings_are_clear_errors():
    with pytest.raises(ConfigError, match=r"train\.lora_targets: no module .* 'qkv'; linear layers here: .*q_proj"):
        apply_lora(make_tiny_llama(), dataclasses.replace(LORA, lora_targets=["qkv"]))
    with pytest.raises(ConfigError, match=r"train\.trainable: no parameter name .* contains 'embedding'"):
        apply_lora(make_tiny_llama(), dataclasses.replace(LORA, trainable=["embedding"]))
    with pytest.raises(ConfigError, match=r"train\.trainable: .* lora_rank is 0"):
        TrainConfig(trainable=["norm"])
    with pytest.raises(ConfigError, match=r"train\.lora_dropout: must be in \[0, 1\), got 1.5"):
        TrainConfig(lora_rank=8, lora_dropout=1.5)
