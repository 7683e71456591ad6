"""``lce report``: exact markdown and CSV on fixed inputs, deduplication, filters, output files and wandb."""

import json
import sys
import types

import pytest

from lce.eval import compare
from lce.eval.compare import load_rows, main, markdown


def ppl_row(run, length, ppl, status="ok", experiment="quick", protocol="canonical", params=None, **extra):
    return {
        "experiment": experiment, "run": run, "method": run, "params": params or {"posenc": {"name": run}},
        "model": {"name": "tiny"}, "seed": 0, "protocol": {"name": protocol, "n_docs": 4}, "train_length": 128,
        "length": length, "status": status, "ppl": ppl if status == "ok" else None, "nll": None, "tokens": 100,
        "tokens_per_s": 1234.5 if status == "ok" else None, "peak_mem_mb": 12.25, "mem_kind": "cpu_rss_delta",
        "seconds": 0.5, **extra,
    }


def trial_row(run, length, depth, trial, correct, experiment="quick", status="ok"):
    return {
        "experiment": experiment, "run": run, "method": run, "params": {}, "model": {"name": "tiny"}, "seed": 0,
        "protocol": {"name": "passkey", "key_digits": 5}, "train_length": 128, "kind": "retrieval",
        "task": "passkey", "length": length, "depth": depth, "trial": trial, "status": status,
        "correct": correct if status == "ok" else None, "answer": 12345, "output": " 12345",
    }


PPL_ROWS = [
    ppl_row("rope", 128, 3.14159), ppl_row("rope", 256, None, status="oom"),
    ppl_row("yarn", 128, 3.5, ppl_low=3.25, ppl_high=3.75), ppl_row("yarn", 256, 41.0),
]
RETRIEVAL_ROWS = [
    trial_row("rope", 256, 0.0, 0, True), trial_row("rope", 256, 0.0, 1, True),
    trial_row("rope", 256, 1.0, 0, False), trial_row("rope", 256, 1.0, 1, True),
    trial_row("rope", 512, 0.0, 0, False), trial_row("rope", 512, 0.0, 1, False),
    trial_row("rope", 512, 1.0, 0, None, status="oom"), trial_row("rope", 512, 1.0, 1, None, status="oom"),
]

EXPECTED_MD = """\
# quick

## Perplexity

| series | 128 | 256 |
| :-- | --: | --: |
| rope | **3.142** | OOM |
| yarn | 3.500 (3.250–3.750) | 41.00 |

Best per length in bold; (low–high): bootstrap confidence interval over documents; OOM: out of memory; -: not \
evaluated.

## Tokens per second

| series | 128 | 256 |
| :-- | --: | --: |
| rope | 1234 | - |
| yarn | 1234 | 1234 |

## Peak memory (MiB)

| series | 128 | 256 |
| :-- | --: | --: |
| rope | 12.2 | 12.2 |
| yarn | 12.2 | 12.2 |

## Retrieval accuracy: passkey, rope

| depth \\ length | 256 | 512 |
| --: | --: | --: |
| 0% | 100% | 0% |
| 100% | 50% | OOM |
| **all** | 75% | 0% |
"""

EXPECTED_CSV = """\
run,method,params,model,length,status,ppl,nll,tokens,tokens_per_s,peak_mem_mb,seed,series,experiment,protocol,\
aggregation,ppl_low,ppl_high,mem_kind,seconds
rope,rope,{ROPE},{TINY},128,ok,3.14159,,100,1234.5,12.25,0,rope,quick,canonical,token_mean,,,cpu_rss_delta,0.5
rope,rope,{ROPE},{TINY},256,oom,,,100,,12.25,0,rope,quick,canonical,token_mean,,,cpu_rss_delta,0.5
yarn,yarn,{YARN},{TINY},128,ok,3.5,,100,1234.5,12.25,0,yarn,quick,canonical,token_mean,3.25,3.75,cpu_rss_delta,0.5
yarn,yarn,{YARN},{TINY},256,ok,41.0,,100,1234.5,12.25,0,yarn,quick,canonical,token_mean,,,cpu_rss_delta,0.5

series,task,length,depth,trials,correct,accuracy,status
rope,passkey,256,0.0,2,2,1.0,ok
rope,passkey,512,0.0,2,0,0.0,ok
rope,passkey,256,1.0,2,1,0.5,ok
rope,passkey,512,1.0,0,0,,oom
""".format(ROPE='"{""posenc"": {""name"": ""rope""}}"', YARN='"{""posenc"": {""name"": ""yarn""}}"',
           TINY='"{""name"": ""tiny""}"')


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def results(tmp_path):
    """Two run directories as lce writes them, plus a training log that must be ignored."""
    write_jsonl(tmp_path / "runs" / "quick" / "results.jsonl", PPL_ROWS[::-1])
    write_jsonl(tmp_path / "runs" / "quick" / "rope" / "retrieval.jsonl", RETRIEVAL_ROWS[::2] + RETRIEVAL_ROWS[1::2])
    write_jsonl(tmp_path / "runs" / "quick" / "rope" / "train_log.jsonl", [{"step": 1, "loss": 2.0}])
    return tmp_path / "runs"


def test_markdown_is_exact(results, capsys):
    assert main([str(results)]) == 0
    assert capsys.readouterr().out == EXPECTED_MD + "\n"


def test_csv_is_exact(results, capsys):
    assert main([str(results), "--format", "csv"]) == 0
    assert capsys.readouterr().out == EXPECTED_CSV


def test_output_does_not_depend_on_file_order_or_duplicates(results, tmp_path, capsys):
    again = write_jsonl(tmp_path / "copy" / "results.jsonl", PPL_ROWS)
    assert main([str(again), str(results), str(results / "quick" / "results.jsonl")]) == 0
    assert capsys.readouterr().out == EXPECTED_MD + "\n"
    assert len(load_rows([results, again])) == len(PPL_ROWS) + len(RETRIEVAL_ROWS)


def test_filters_and_labels(tmp_path, capsys):
    rows = PPL_ROWS + [ppl_row("rope", 128, 2.5, experiment="other"),
                       ppl_row("rope", 128, 2.75, protocol="yarn", aggregation="mean_of_window_means")]
    path = write_jsonl(tmp_path / "results.jsonl", rows)
    assert main([str(path), "--experiment", "quick", "--run", "y*"]) == 0
    out = capsys.readouterr().out
    assert "| yarn | 3.500 (3.250–3.750) | 41.00 |" in out and "rope" not in out
    # Experiments and protocols are named only when they differ; non-token-weighted protocols carry a dagger.
    assert main([str(path), "--run", "rope"]) == 0
    out = capsys.readouterr().out
    assert "| other/rope [canonical] | **2.500** |" in out
    assert "| quick/rope [yarn] † | 2.750 |" in out and "†: mean of per-window" in out


def test_series_of_one_position_encoding_under_two_attention_variants_are_two_series(tmp_path, capsys):
    # eval.posencs labels a series by its position encoding: `rope` swept under full attention and under
    # attention=moba into one results directory must be two series, named by the variant, not a clash
    full, moba = ({"posenc": {"name": "rope"}, "attention": attention}
                  for attention in ({"name": "full"}, {"name": "moba", "initial_blocks": 1}))
    path = write_jsonl(tmp_path / "results.jsonl", [ppl_row("rope", 128, 3.0, params=full),
                                                    ppl_row("rope", 128, 4.0, params=moba)])
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "| rope + full | **3.000** |" in out and "| rope + moba initial_blocks=1 | 4.000 |" in out


def test_clashing_points_and_missing_inputs_are_errors(tmp_path, capsys):
    clash = write_jsonl(tmp_path / "results.jsonl", [ppl_row("rope", 128, 3.0), ppl_row("rope", 128, 4.0, seed=1)])
    assert main([str(clash)]) == 2
    assert "two different points for series 'rope' at length 128" in capsys.readouterr().err
    assert main([str(tmp_path / "nothing")]) == 2
    assert "neither a result file nor a directory" in capsys.readouterr().err
    assert main([str(clash), "--run", "none*"]) == 2
    assert "no finished rows" in capsys.readouterr().err


def test_out_dir_files(results, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(results), "--out", str(out), "--title", "quick"]) == 0
    assert (out / "report.md").read_text() == EXPECTED_MD + "\n"
    assert (out / "ppl_vs_length.csv").read_text() + "\n" + (out / "retrieval.csv").read_text() == EXPECTED_CSV
    pngs = ("ppl_vs_length.png", "nll_vs_position.png", "retrieval_rope_passkey.png")
    for png in pngs:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.md", "ppl_vs_length.csv", "retrieval.csv", *pngs])
    # The paths come after the report, as at the end of a run.
    assert capsys.readouterr().out.endswith(f" plots: {', '.join(str(out / png) for png in pngs)}\n")


def test_wandb_logs_offline_without_a_key(results, tmp_path, monkeypatch, capsys):
    calls = {}

    class Run:
        def log(self, payload):
            calls["logged"] = sorted(payload)

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    fake = types.SimpleNamespace(
        init=init, Settings=lambda **kw: kw, Table=lambda columns, data: ("table", columns, len(data)),
        Image=lambda path: ("image", path),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr("lce.loggers.wandb_key_available", lambda: False)
    assert main([str(results), "--out", str(tmp_path / "r"), "--wandb"]) == 0
    capsys.readouterr()
    assert calls["init"]["mode"] == "offline" and calls["init"]["job_type"] == "report" and calls["finished"]
    assert calls["logged"] == ["heatmap/rope/passkey", "position_png", "ppl", "ppl_png", "retrieval"]


def test_markdown_of_retrieval_only_rows():
    text = markdown(RETRIEVAL_ROWS)
    assert "## Perplexity" not in text and "## Retrieval accuracy: passkey, rope" in text
    assert compare.retrieval_csv(RETRIEVAL_ROWS).splitlines()[1] == "rope,passkey,256,0.0,2,2,1.0,ok"


def test_nonfinite_points_are_named_in_markdown_csv_and_plots(tmp_path, capsys):
    rows = PPL_ROWS + [ppl_row("yarn", 512, None, status="nonfinite", error="non-finite result: nll=nan, ppl=nan"),
                       ppl_row("rope", 512, None, status="nonfinite")]
    path = write_jsonl(tmp_path / "results.jsonl", rows)
    assert main([str(path), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "| rope | **3.142** | OOM | non-finite |" in out
    assert "| yarn | 3.500 (3.250–3.750) | 41.00 | non-finite |" in out
    assert "OOM: out of memory; non-finite: NaN or infinite loss, no perplexity; -: not evaluated." in out
    assert main([str(path), "--format", "csv"]) == 0
    assert any(line.startswith("rope,rope,") and line.endswith(
        ",512,nonfinite,,,100,,12.25,0,rope,quick,canonical,token_mean,,,cpu_rss_delta,0.5")
        for line in capsys.readouterr().out.splitlines())
    assert (tmp_path / "report" / "ppl_vs_length.png").read_bytes()[:4] == b"\x89PNG"
    # Without non-finite points the note is not there (see EXPECTED_MD).
    assert "non-finite" not in EXPECTED_MD
