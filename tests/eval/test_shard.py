"""Sharded evaluation: two processes write exactly the points one process writes, resume, share an OOM, and run
retrieval once."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lce.errors import LceError
from lce.eval.protocols import YarnProtocol
from lce.eval.shard import Shard, current_shard, score_sharded
from lce.eval.sweep import SCORE_FIELDS, ResultStore, is_out_of_memory
from tests.eval import sharded_sweep

REPO_ROOT = Path(__file__).resolve().parents[2]


def launch_two_processes(out_dir: Path) -> None:
    """``sharded_sweep.py`` under ``torch.distributed.run`` (the launcher ``accelerate launch`` uses for several
    processes; ``accelerate launch --cpu`` starts only one without MPI), two CPU processes over gloo."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO_ROOT / "tests/eval/sharded_sweep.py"), str(out_dir)]
    done = subprocess.run(command, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    _, forwards = sharded_sweep.sweep(out, sharded_sweep.LENGTHS, Shard())
    (out / "forwards.txt").write_text(f"{forwards}")
    return out


def rows_by_point(path: Path) -> dict:
    return {(row["run"], row["length"]): row for row in ResultStore(path).rows()}


def test_two_processes_write_exactly_the_one_process_points_resume_and_share_an_oom(one_process, tmp_path):
    launch_two_processes(tmp_path)
    for name in sharded_sweep.PROTOCOLS:
        two = ResultStore(tmp_path / f"{name}.jsonl").rows()
        # One row per length: the second sweep of the script resumed from the first one's two points.
        assert [row["length"] for row in two] == sharded_sweep.LENGTHS
        one = rows_by_point(one_process / f"{name}.jsonl")
        for row in two:
            expected = one[(row["run"], row["length"])]
            assert row["status"] == "ok"
            # Exact: every batch is computed by the same code on the same tensor with one thread, and the
            # protocol sums the gathered values in the one-process order.
            assert {k: row[k] for k in SCORE_FIELDS} == {k: expected[k] for k in SCORE_FIELDS}, (name, row["length"])
    returned = {(tmp_path / f"returned_{rank}.txt").read_text() for rank in (0, 1)}
    assert len(returned) == 1, "every process returns the same rows"
    # The work was shared, not repeated: each process ran about half of the one-process forward passes.
    forwards = [int((tmp_path / f"forwards_{rank}.txt").read_text()) for rank in (0, 1)]
    assert sum(forwards) == int((one_process / "forwards.txt").read_text()) and min(forwards) >= sum(forwards) // 3

    oom = ResultStore(tmp_path / "oom.jsonl").rows()
    lengths = sharded_sweep.LENGTHS
    assert [(row["length"], row["status"]) for row in oom] == [
        (length, "oom" if length == sharded_sweep.OOM_LENGTH else "ok") for length in lengths]
    assert "out of memory on process 1" in oom[1]["error"]
    assert oom[2]["nll"] == rows_by_point(one_process / "canonical.jsonl")[("canonical", lengths[2])]["nll"]

    # Retrieval trials run once, on the main process; every process returns its rows.
    assert len(ResultStore(tmp_path / "retrieval.jsonl").rows()) == 2 * 2 * 2
    main, other = ((tmp_path / f"retrieval_{rank}.txt").read_text().split(" ", 1) for rank in (0, 1))
    assert (main[0], other[0]) == ("8", "0") and main[1] == other[1] == str([True] * 8)


def test_one_process_passes_nll_fn_through():
    calls = []

    def nll_fn(ids):
        calls.append(ids.shape)
        return torch.ones(ids.shape[0], ids.shape[1] - 1)

    score = score_sharded(lambda fn: YarnProtocol(stride=4).score(fn, [torch.arange(10)], 6), nll_fn, Shard(),
                          is_out_of_memory)
    assert score.nll == 1.0 and len(calls) == 2


def test_shard_round_robin_and_bad_rank():
    assert [i for i in range(7) if Shard(1, 3).owns(i)] == [1, 4]
    assert Shard(0, 2).is_main and not Shard(1, 2).is_main
    with pytest.raises(LceError, match="rank 2 is not in"):
        Shard(2, 2)


def test_single_process_without_a_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert current_shard() == Shard()
