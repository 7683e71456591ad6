"""experiments/benchmarks/gpu.sh in its dry run (no GPU): the real-model part composes both experiments for cuda and
reports itself in summary.tsv; an unknown part is refused with exit code 2."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "benchmarks" / "gpu.sh"


def run(tmp_path, *parts):
    env = {**os.environ, "LCE_GPU_DRY_RUN": "1", "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), *parts], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)


def test_real_part_composes_both_experiments_for_cuda(tmp_path):
    result = run(tmp_path, "real")
    assert result.returncode == 0, result.stdout + result.stderr
    log = (tmp_path / "out" / "logs" / "real.log").read_text()
    assert "experiment=real_extrapolation device=cuda composes" in log
    assert "experiment=real_retrieval device=cuda composes" in log
    summary = (tmp_path / "out" / "summary.tsv").read_text().splitlines()
    assert any(line.startswith("real\tpassed\t0\t") for line in summary)


def test_unknown_part_is_refused(tmp_path):
    result = run(tmp_path, "bogus")
    assert result.returncode == 2 and "unknown part 'bogus'" in result.stderr
