"""lce's lm-evaluation-harness model (``lce.eval.harness``): its log-likelihoods are lce's own scores of the same
tokens, long inputs are scored whole or refused (never truncated), and the experiment stores one row per task,
resumably. Offline: lce's bundled demo tasks (``lce/eval/harness/tasks/``, local JSON) and tiny models."""

import json
import math
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is lce's optional 'harness' extra")

import lm_eval.tasks
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from omegaconf import OmegaConf

import lce
import lce.conf
from lce.errors import ConfigError
from lce.eval.harness import BUNDLED_TASKS, HarnessConfig, build_harness, cli_arguments, run_harness
from lce.eval.harness.model import LceLM, split_model_args
from lce.eval.perplexity import model_nll_fn, score_documents

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64}
META = {"run": "r", "method": "rope", "params": {}, "model": {"name": "tiny_llama"}, "seed": 0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return lce.load_model("tiny_llama", **TINY)


@pytest.fixture(scope="module")
def task_manager():
    """lce's bundled tasks and lm-eval's long-context suites (indexing all of lm-eval's tasks takes seconds)."""
    suites = [str(Path(lm_eval.tasks.__file__).parent / name) for name in ("longbench", "infinitebench", "ruler")]
    return TaskManager(include_path=[str(BUNDLED_TASKS), *suites], include_defaults=False)


def _lm(tiny, **kwargs) -> LceLM:
    model, tokenizer = tiny
    return LceLM(pretrained=model, tokenizer=tokenizer, device="cpu", **kwargs)


def _request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_is_lces_own_score(tiny):
    """The summed log-probability of a continuation equals minus lce's perplexity NLL (``model_nll_fn``) of the same
    tokens; ``is_greedy`` says whether each continuation token is the argmax."""
    lm = _lm(tiny)
    context, continuation = "def add(a, b):\n    return", " a + b\n"
    (logprob, greedy), = lm.loglikelihood([_request("loglikelihood", context, continuation)])
    ids = lm.tok_encode(context + continuation)
    n = len(lm.tok_encode(continuation))
    nll = model_nll_fn(tiny[0])(torch.tensor([ids]))[0]  # [T-1]: NLL of token t+1
    assert logprob == pytest.approx(-float(nll[-n:].double().sum()), rel=1e-5, abs=1e-5)
    with torch.no_grad():
        logits = tiny[0](torch.tensor([ids])).logits[0]
    assert greedy == bool((logits[-n - 1 : -1].argmax(-1) == torch.tensor(ids[-n:])).all())
    # The argmax token is greedy, any other is not (token level: lm-eval moves a context's trailing whitespace).
    argmax = int(logits[-1].argmax())
    other = (argmax + 1) % logits.shape[-1]
    assert [g for _, g in lm._loglikelihood_tokens([(None, ids, [argmax]), (None, ids, [other])])] == [True, False]


def test_loglikelihood_rolling_is_lces_perplexity_nll(tiny):
    """A text's rolling log-likelihood is minus lce's summed perplexity NLL of ``[prefix] + tokens``, in one window
    without a length bound and summed over lm-eval's disjoint windows with one."""
    text = "import os\nimport sys\n\n\ndef main():\n    print(os.getcwd(), file=sys.stderr)\n" * 2
    lm = _lm(tiny)
    ids = torch.tensor([lm.prefix_token_id, *lm.tok_encode(text)])
    expected = -score_documents(tiny[0], [ids], length=ids.numel()).nll_sum
    assert lm.max_length is None
    (whole,) = lm.loglikelihood_rolling([_request("loglikelihood_rolling", text)])
    assert whole == pytest.approx(expected, rel=1e-5)

    windowed = _lm(tiny, max_length=40)
    windows = windowed.rolling_windows(windowed.tok_encode(text))
    assert len(windows) > 1 and sum(len(p) for _, p in windows) == ids.numel() - 1
    (rolled,) = windowed.loglikelihood_rolling([_request("loglikelihood_rolling", text)])
    nll_fn = model_nll_fn(tiny[0])
    by_window = sum(-float(nll_fn(torch.tensor([c + p]))[0, -len(p):].double().sum()) for c, p in windows)
    assert rolled == pytest.approx(by_window, rel=1e-5)


def test_generate_until_stops_at_until_and_max_gen_toks(tiny):
    lm = _lm(tiny)
    context = "for i in range(10):\n    print("
    free = lm.greedy_until(lm.tok_encode(context), [], 12)
    assert len(lm.tok_encode(free)) <= 12
    stop = free[3:5]
    (text,) = lm.generate_until([_request("generate_until", context, {"until": [stop], "max_gen_toks": 12})])
    assert stop not in text and free.startswith(text) and len(text) < len(free)
    (text,) = lm.generate_until([_request("generate_until", context, {"until": ["\x00"], "max_gen_toks": 3})])
    assert len(lm.tok_encode(text)) <= 3
    with pytest.raises(ConfigError, match=r"do_sample=True is not supported"):
        lm.generate_until([_request("generate_until", context, {"do_sample": True})])


def test_a_patched_model_scores_inputs_beyond_its_training_length_whole():
    """YaRN factor 2 on a model trained at 64 tokens supports 128: a 120-token input is scored whole (equal to lce's
    own score of it, which a truncation to 64 would not be), a longer one is refused, never cut."""
    lm = LceLM.create_from_arg_string("pretrained=tiny_llama,posenc=yarn,factor=2,device=cpu,"
                                      + ",".join(f"model.{k}={v}" for k, v in TINY.items()))
    assert lce.patch_spec(lm.model)["posenc"]["factor"] == 2
    assert lm.max_length == 128 and "yarn" in lm.length_source
    tokens = lm.tok_encode("x = 1\n" * 20)  # 120 tokens: 119 predictions from 119 inputs, beyond 64, within 128
    context, continuation = lm.tok_decode(tokens[:99]), lm.tok_decode(tokens[99:])  # "... x =", " 1\n..."
    (logprob, _), = lm.loglikelihood([_request("loglikelihood", context, continuation)])
    nll = model_nll_fn(lm.model)(torch.tensor([tokens]))[0]
    assert logprob == pytest.approx(-float(nll[-21:].double().sum()), rel=1e-5)
    longer = continuation + "y = 22\n" * 3  # 141 tokens: 140 inputs
    with pytest.raises(ConfigError, match=r"^loglikelihood: an input of 140 tokens is longer than max_length=128 "
                                          r"\(rope_type=yarn .*lce does not truncate it"):
        lm.loglikelihood([_request("loglikelihood", context, longer)])
    with pytest.raises(ConfigError, match=r"^generate_until: an input of 219 tokens \(99 prompt tokens \+ "
                                          r"max_gen_toks 120\) is longer than max_length=128"):
        lm.generate_until([_request("generate_until", context, {"max_gen_toks": 120})])
    # Perplexity tasks are cut into rolling windows of max_length, as lm-eval documents.
    (rolled,) = lm.loglikelihood_rolling([_request("loglikelihood_rolling", "x = 1\n" * 40)])
    assert math.isfinite(rolled) and len(lm.rolling_windows(lm.tok_encode("x = 1\n" * 40))) == 2


def test_bad_model_args_are_lces_one_line_errors():
    with pytest.raises(ConfigError, match=r"^posenc\.facter: unknown key \(did you mean 'factor'\?\)"):
        LceLM.create_from_arg_string("pretrained=tiny_llama,posenc=yarn,facter=2")
    with pytest.raises(ConfigError, match=r"^model\.hidden: unknown key"):
        LceLM.create_from_arg_string("pretrained=tiny_llama,model.hidden=2")
    with pytest.raises(ConfigError, match=r"^model_args: optim\.lr: unknown key"):
        LceLM.create_from_arg_string("pretrained=tiny_llama,optim.lr=2")
    assert split_model_args({"factor": 4, "dtype": "bfloat16", "attention.window": 8, "max_length": 9}) == (
        {"max_length": 9}, {"model": {"dtype": "bfloat16"}, "posenc": {"factor": 4}, "attention": {"window": 8}})


def test_simple_evaluate_runs_the_bundled_tasks_offline(tiny, task_manager):
    """Every request type through lm-eval's own evaluator: perplexity, multiple choice and generation."""
    out = simple_evaluate(model=_lm(tiny), tasks=["lce_demo"], task_manager=task_manager, bootstrap_iters=0,
                          log_samples=False)
    results = out["results"]
    assert 0 <= results["lce_demo_choice"]["acc,none"] <= 1
    assert 0 <= results["lce_demo_gen"]["exact_match,none"] <= 1
    assert 1 < results["lce_demo_ppl"]["byte_perplexity,none"] < 1e4
    assert out["n-samples"]["lce_demo_ppl"] == {"original": 4, "effective": 4}


def test_run_harness_resumes_without_loss_or_duplication(tiny, tmp_path, monkeypatch):
    """One row per task, appended as each finishes; a rerun after a crash runs only the missing task, and a rerun of
    a finished series runs nothing."""
    from lce.eval.harness import run as harness_run

    config = HarnessConfig(tasks=["lce_demo_choice", "lce_demo_gen"], limit=2, bootstrap_iters=0)
    store = tmp_path / "harness.jsonl"
    evaluate = harness_run._evaluate
    ran = []

    def crash_on_gen(simple_evaluate, lm, task, *args):
        ran.append(task)
        if task == "lce_demo_gen" and len(ran) == 2:
            raise KeyboardInterrupt
        return evaluate(simple_evaluate, lm, task, *args)

    monkeypatch.setattr(harness_run, "_evaluate", crash_on_gen)
    with pytest.raises(KeyboardInterrupt):
        run_harness(*tiny, config, store, meta=META, device="cpu", progress=False)
    assert [json.loads(line)["task"] for line in store.read_text().splitlines()] == ["lce_demo_choice"]
    rows = run_harness(*tiny, config, store, meta=META, device="cpu", progress=False)
    assert ran == ["lce_demo_choice", "lce_demo_gen", "lce_demo_gen"]
    assert [r["task"] for r in rows] == ["lce_demo_choice", "lce_demo_gen"]
    assert rows[0]["status"] == "ok" and "acc,none" in rows[0]["results"]["lce_demo_choice"]
    assert rows[0]["length"] is None and rows[0]["protocol"]["harness"]["limit"] == 2
    again = run_harness(*tiny, config, store, meta=META, device="cpu", progress=False)
    assert len(ran) == 3 and again == rows
    assert len(store.read_text().splitlines()) == 2


def test_the_experiment_stores_harness_metrics_beside_perplexity(tmp_path, capsys):
    """``eval/harness`` in an experiment: harness.jsonl beside results.jsonl, a table in the report, and a rerun that
    adds no row."""
    from lce import experiment

    harness = {"name": "lce_demo", "tasks": ["lce_demo_choice"], "limit": 2, "bootstrap_iters": 0}
    cfg = OmegaConf.create({
        "model": {"name": "tiny_llama", **TINY}, "posenc": {"name": "rope"}, "attention": {"name": "full"},
        "data": {"name": "stdlib"}, "task": "eval", "threads": 1,
        "eval": {"lengths": [32], "n_docs": 1, "batch_size": 1, "harness": harness}})
    experiment.run(cfg, tmp_path, progress=False)
    experiment.run(cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "harness.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows] == ["lce_demo_choice"] and rows[0]["run"] == "run"
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 1
    report = (tmp_path / "report.md").read_text()
    assert "## Perplexity" in report and "## Harness: lce_demo_choice" in report and "lce_demo_choice acc" in report


def test_harness_options_compose_and_name_lm_eval_tasks(task_manager):
    """Every eval/harness option composes into a run config and names tasks lm-eval 0.4.13 knows."""
    from hydra import compose, initialize_config_module

    from lce.experiment import parse_run_config

    names = set(task_manager.all_tasks)
    conf = Path(lce.conf.__file__).parent / "eval" / "harness"
    options = sorted(p.stem for p in conf.glob("*.yaml"))
    assert options == ["infinitebench", "lce_demo", "longbench", "longbench_e", "ruler_qa"]
    with initialize_config_module(config_module="lce.conf", version_base="1.3"):
        for option in options:
            harness = parse_run_config(compose("config", overrides=[f"eval/harness={option}"])).eval.harness
            assert harness.name == option and set(harness.tasks) <= names, option
        run_cfg = parse_run_config(compose("config", overrides=["experiment=harness"]))
    assert run_cfg.eval.harness.tasks == ["lce_demo_ppl", "lce_demo_choice", "lce_demo_gen"]
    with pytest.raises(ConfigError, match=r"^eval\.harness\.limt: unknown key \(did you mean 'limit'\?\)"):
        build_harness({"tasks": ["lce_demo"], "limt": 2})


def test_the_command_line_finds_the_lce_model(monkeypatch, capsys):
    """``python -m lce.eval.harness`` is lm-eval's command line with ``lce`` registered: lm-eval builds lce's model
    from ``--model_args`` and a bad key is one line (exit status 2); lce's bundled tasks and ``--device auto`` are
    added unless given."""
    from lm_eval.api.registry import get_model

    from lce.eval.harness.__main__ import main

    assert get_model("lce") is LceLM and get_model("hf").__name__ == "HFLM"  # lm-eval's own models stay registered
    assert cli_arguments(["--model", "lce"])[-4:] == ["--include_path", str(BUNDLED_TASKS), "--device", "auto"]
    assert cli_arguments(["ls", "tasks", "--include_path", "x"]) == ["ls", "tasks", "--include_path", "x"]
    monkeypatch.setattr(sys, "argv", ["lce.eval.harness"])
    # lm-eval's command line indexes all its tasks first (seconds); the bundled ones are enough here.
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", partial(TaskManager, include_defaults=False))
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "lce", "--model_args", "pretrained=tiny_llama,posenc=yarn,facter=2", "--tasks",
              "lce_demo_choice"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: posenc.facter: unknown key (did you mean 'factor'?)")
