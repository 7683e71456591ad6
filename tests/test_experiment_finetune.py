"""The fine-tuning recipes: every paper recipe's tiny variant composes to the paper's settings scaled down, and tiny
recipes run end to end (train, merge, save, sweep) on a saved tiny base model."""

import json

import pytest
from hydra import compose, initialize_config_module

import lce
from lce.experiment import parse_run_config, run
from lce.hf.patch import patch_spec

RECIPES = ["yarn_finetune", "pi_finetune", "longlora", "pose", "dca_finetune", "alibi_scratch"]
# pi_finetune_tiny takes yarn_finetune_tiny's schedule so that the toy comparison differs in the method only.
DELIBERATE = {"pi_finetune": {"schedule"}}


def composed(overrides):
    with initialize_config_module(config_module="lce.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("recipe", RECIPES)
def test_tiny_variant_keeps_the_recipe_method(recipe):
    full, tiny = (parse_run_config(composed([f"experiment={name}"])) for name in (recipe, f"{recipe}_tiny"))
    assert (tiny.posenc.name, tiny.attention.name) == (full.posenc.name, full.attention.name)
    for key in {"lora_rank", "lora_alpha", "lora_targets", "trainable", "schedule", "betas", "weight_decay"} - \
            DELIBERATE.get(recipe, set()):
        assert getattr(tiny.train, key) == getattr(full.train, key), key
    assert bool(tiny.train.pose_target_len) == bool(full.train.pose_target_len)
    assert tiny.train.seq_len <= 1024 and tiny.train.steps <= 1500


def test_paper_settings():
    yarn = parse_run_config(composed(["experiment=yarn_finetune"])).train
    assert (yarn.steps, yarn.lr, yarn.betas, yarn.weight_decay, yarn.warmup_steps) == (400, 2e-5, [0.9, 0.95], 0.0, 20)
    longlora = parse_run_config(composed(["experiment=longlora"]))
    assert (longlora.train.lora_rank, longlora.train.lora_alpha,
            longlora.train.trainable) == (8, 16.0, ["embed", "norm"])
    assert (longlora.attention.name, longlora.train.steps, longlora.train.lr) == ("s2_attn", 1000, 2e-5)
    assert parse_run_config(composed(["experiment=pi_finetune"])).train.steps == 1000


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "model"
    model, tokenizer = lce.load_model("tiny_llama", max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                                      intermediate_size=64)
    lce.save_model(model, tokenizer, path)
    return path


@pytest.mark.parametrize("recipe,steps", [("longlora_tiny", 2), ("pose_tiny", 2)])
def test_tiny_recipe_runs_end_to_end(recipe, steps, base_model, tmp_path):
    cfg = composed([f"experiment={recipe}", f"model.path={base_model}", f"train.steps={steps}",
                    "train.micro_batch_size=2", "train.grad_accum=1", "train.seq_len=64", "eval.lengths=[64,128]",
                    "eval.n_docs=2", "eval.batch_size=2", "train.checkpoint_every=1"])
    rows = run(cfg, tmp_path / "run", tmp_path, progress=False)
    assert {r["length"] for r in rows} == {64, 128} and all(r["status"] == "ok" for r in rows)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, steps + 1)) and all(r["max_rss_mb"] > 0 for r in log)
    saved, _ = lce.load_model(tmp_path / "run" / "model")
    spec = patch_spec(saved)
    assert spec["posenc"]["name"] == parse_run_config(cfg).posenc.name
    assert not any("lora" in name for name, _ in saved.named_parameters())  # adapters merged before saving
