"""One of two identical evaluations run at once into one result file (a relaunched job, a SLURM requeue), for
``test_sweep.py`` and ``test_retrieval.py``:

    python tests/eval/concurrent_run.py {sweep|retrieval} NAME OTHER PATH

Before each point (or trial) is scored, the process waits until process ``OTHER`` has reached the same point, so both
have read the store and computed the point before either appends it: the race the store must settle. The rows it
returns are printed as one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def in_step(me: str, other: str, directory: Path, step: int, timeout_s: float = 120.0) -> None:
    """Mark step ``step`` of ``me`` as reached and wait for ``other`` to reach it too."""
    (directory / f"{me}.{step}").touch()
    deadline = time.monotonic() + timeout_s
    while not (directory / f"{other}.{step}").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{other} never reached step {step}")
        time.sleep(0.01)


def launch_pair(kind: str, path: Path) -> list[list[dict]]:
    """Run two identical ``kind`` evaluations into ``path`` at once; the rows each returned."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(Path(__file__)), kind, me, other, str(path)], cwd=REPO_ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for me, other in (("a", "b"), ("b", "a"))
    ]
    try:
        results = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in results]


def main(kind: str, me: str, other: str, path: str) -> None:
    steps = []

    def wait_for_other() -> None:
        steps.append(None)
        in_step(me, other, Path(path).parent, len(steps))

    if kind == "sweep":
        from lce.eval import sweep
        from tests.eval.test_sweep import sweep_inputs

        score = sweep.CanonicalProtocol.score

        def score_in_step(*args, **kwargs):
            wait_for_other()
            return score(*args, **kwargs)

        sweep.CanonicalProtocol.score = score_in_step
        model, docs, lengths, meta = sweep_inputs()
        rows = sweep.run_sweep(model, docs, lengths, path, meta=meta, bucket_size=16, progress=False)
    else:
        from tests.eval.test_retrieval import oracle, run

        def generate_in_step(ids, max_new_tokens):
            wait_for_other()
            return oracle(ids, max_new_tokens)

        rows = run(path, generate=generate_in_step)
    print(json.dumps(rows))


if __name__ == "__main__":
    main(*sys.argv[1:])
