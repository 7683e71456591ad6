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


def _config(**overrides):
    base = {"model": {"name": "tiny_llama", "hidden_size": 32, "num_hidden_layers": 1}, "posenc": {"name": "rope"},
            "attention": {"name": "full"}, "data": {"name": "stdlib"}}
    return OmegaConf.create({**base, **overrides})


def test_eval_posencs_of_another_signal_are_refused_before_training(tmp_path, monkeypatch):
    """An ALiBi-trained model re-patched with RoPE methods measures a broken model: refused, before any training,
    unless asked for; rows name the encoding the model was trained with next to the one it is evaluated with."""
    import pytest

    from lce.errors import ConfigError

    def no_training(*args):
        raise AssertionError("trained before refusing")

    monkeypatch.setattr(experiment, "_train", no_training)
    cfg = _config(posenc={"name": "alibi"}, eval={"posencs": [{"name": "alibi"}, {"name": "yarn", "factor": 4}]})
    with pytest.raises(ConfigError, match=r"^eval\.posencs\[1\]: yarn gives the model rotary positions, but it was "
                                          r"trained with alibi \(alibi positions\)"):
        experiment.run(cfg, tmp_path / "run", progress=False)

    seen = {}
    monkeypatch.setattr(experiment, "_train", lambda run_cfg, model, *args: model)

    def sweep(run_cfg, model, tokenizer, results_dir, logger, device, trained, *rest):
        seen["trained"] = trained
        return []

    monkeypatch.setattr(experiment, "_sweep", sweep)
    cfg.eval.allow_other_signals = True
    experiment.run(cfg, tmp_path / "run", progress=False)
    assert seen["trained"].name == "alibi"


def test_an_evaluation_names_the_encoding_the_checkpoint_was_trained_with(tmp_path):
    import pytest

    import lce
    from lce.errors import ConfigError

    model, tokenizer = lce.load_model("tiny_llama", hidden_size=32, num_hidden_layers=1)
    lce.save_model(lce.patch(model, "nope"), tokenizer, tmp_path / "nope-model")
    evaluation = {"lengths": [16, 32], "n_docs": 1, "batch_size": 1}
    cfg = _config(model={"name": "hf", "path": str(tmp_path / "nope-model")}, task="eval", eval=evaluation)
    with pytest.raises(ConfigError, match=r"^posenc: rope gives the model rotary positions, but it was trained with "
                                          r"nope \(none positions\)"):
        experiment.run(cfg, tmp_path / "rope", progress=False)
    cfg.posenc = {"name": "nope"}
    rows = experiment.run(cfg, tmp_path / "nope", progress=False)
    assert [(r["method"], r["trained_posenc"]) for r in rows] == [("nope", {"name": "nope"})] * 2


def test_threads_auto_runs_a_tiny_model_on_one_cpu_thread(monkeypatch):
    import torch

    from lce.experiment import ONE_THREAD_PARAMS, set_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        small, large = torch.nn.Linear(10, 10), torch.nn.Linear(ONE_THREAD_PARAMS, 1)
        torch.set_num_threads(2)
        set_threads("auto", large, torch.device("cpu"))
        assert torch.get_num_threads() == 2  # torch's default is kept for a model worth splitting
        set_threads("auto", small, torch.device("cuda"))
        assert torch.get_num_threads() == 2  # the CPU threads barely matter for a GPU run
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        set_threads("auto", small, torch.device("cpu"))
        assert torch.get_num_threads() == 2  # the user's choice stands
        monkeypatch.delenv("OMP_NUM_THREADS")
        set_threads("auto", small, torch.device("cpu"))
        assert torch.get_num_threads() == 1
        set_threads(2, small, torch.device("cpu"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_model_without_tokenizer_is_named_before_any_work(tmp_path):
    """A plain ``save_pretrained`` directory loads with tokenizer None (lce.load_model warns); a run needs one."""
    import pytest

    from lce.errors import ConfigError
    from tests.conftest import make_tiny_llama

    make_tiny_llama().save_pretrained(tmp_path / "bare")
    cfg = _config(model={"name": "hf", "path": str(tmp_path / "bare")}, task="eval")
    with pytest.warns(UserWarning, match="no tokenizer"), pytest.raises(
            ConfigError, match=r"^model\.tokenizer: the model at .*bare' holds no tokenizer"):
        experiment.run(cfg, tmp_path / "run", progress=False)


def test_the_end_of_a_sweep_and_lce_report_write_the_same_report(tmp_path, capsys):
    """One report pipeline: the files a run writes at the end of its sweep (perplexity and retrieval) are those
    ``lce report <results dir> --out <dir>`` writes, with the same contents (plots: the same names), and the two
    print the same table and the paths of the same files."""
    import re

    import lce
    from lce.eval.compare import main as lce_report

    model, tokenizer = lce.load_model("tiny_llama", hidden_size=32, num_hidden_layers=1)
    lce.save_model(model, tokenizer, tmp_path / "model")
    passkey = {"name": "passkey", "lengths": [320], "depths": [0.0, 1.0], "trials": 1, "key_digits": 2}
    evaluation = {"lengths": [16, 32], "n_docs": 1, "batch_size": 1, "retrieval": {"passkey": passkey}}
    cfg = _config(model={"name": "hf", "path": str(tmp_path / "model")}, task="eval", eval=evaluation)
    results, out = tmp_path / "run", tmp_path / "report"
    experiment.run(cfg, results, progress=True)
    by_run = capsys.readouterr().out
    assert lce_report([str(results), "--out", str(out)]) == 0
    by_report = capsys.readouterr().out

    written = sorted(p.name for p in out.iterdir())
    assert written == ["nll_vs_position.png", "ppl_vs_length.csv", "ppl_vs_length.png", "report.md", "retrieval.csv",
                       "retrieval_run_passkey.png"]
    for name in written:
        assert (results / name).is_file()
        if not name.endswith(".png"):
            assert (results / name).read_text() == (out / name).read_text(), name
    table = (out / "report.md").read_text()
    assert table in by_run and table in by_report

    def printed(text: str, directory) -> dict[str, list[str]]:
        lines = re.findall(r"^ *(report|tables|plots): (.*)$", text, re.MULTILINE)
        return {kind: [p.replace(str(directory), "DIR") for p in paths.split(", ")] for kind, paths in lines}

    assert printed(by_run, results) == printed(by_report, out)
    assert printed(by_report, out)["report"] == ["DIR/report.md"]
