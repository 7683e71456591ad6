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
