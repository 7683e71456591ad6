"""lce.experiment.run: the configured kernel backend is in force for the whole run."""

from omegaconf import OmegaConf

from lce import experiment
from lce.kernels.backend import requested_backend


def test_the_run_config_backend_covers_training_and_evaluation(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(experiment, "_train",
                        lambda run_cfg, model, *args: seen.setdefault("train", requested_backend()) and model)
    monkeypatch.setattr(experiment, "_sweep", lambda *args: seen.setdefault("sweep", requested_backend()) and [])
    monkeypatch.delenv("LCE_BACKEND", raising=False)
    cfg = OmegaConf.create({"model": {"name": "tiny_llama"}, "posenc": {"name": "rope"}, "attention": {"name": "full"},
                            "data": {"name": "stdlib"}, "backend": "ref"})
    experiment.run(cfg, tmp_path / "run", progress=False)
    assert seen == {"train": "ref", "sweep": "ref"}
    assert requested_backend() == "auto"  # restored after the run


def test_documents_can_be_longer_than_the_longest_length(tmp_path, monkeypatch):
    """eval.min_doc_tokens selects the documents (YaRN's 8k runs read its >= 131072-token documents)."""
    import pytest

    from lce.errors import ConfigError
    from lce.eval.config import EvalConfig

    seen = {}

    def documents(source, tokenizer, min_tokens, n_docs, split, policy):
        seen["min_tokens"] = min_tokens
        raise RuntimeError("stop after selecting")

    monkeypatch.setattr(experiment, "eval_documents", documents)
    cfg = OmegaConf.create({"model": {"name": "tiny_llama"}, "posenc": {"name": "rope"}, "attention": {"name": "full"},
                            "data": {"name": "stdlib"}, "task": "eval",
                            "eval": {"lengths": [32, 64], "min_doc_tokens": 500}})
    with pytest.raises(RuntimeError, match="stop after selecting"):
        experiment.run(cfg, tmp_path / "run", progress=False)
    assert seen == {"min_tokens": 500}
    with pytest.raises(ConfigError, match=r"eval\.min_doc_tokens: must be at least the longest length 64"):
        EvalConfig(lengths=[32, 64], min_doc_tokens=40)
