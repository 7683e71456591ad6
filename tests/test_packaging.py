"""The wheel ships conf/ as lce.conf and kernels/ as lce.kernels, never a top-level ``kernels`` package."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = out.glob("lce-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return {name: z.read(name).decode() if name.endswith(".txt") else "" for name in z.namelist()}


def test_every_config_file_is_in_the_wheel(wheel_files):
    configs = {f"lce/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert configs and configs <= set(wheel_files)


def test_kernels_only_as_a_subpackage(wheel_files):
    assert "lce/kernels/__init__.py" in wheel_files
    assert not any(name.startswith("kernels/") for name in wheel_files)


def test_console_script(wheel_files):
    (entry_points,) = [n for n in wheel_files if n.endswith("entry_points.txt")]
    assert "lce = lce.cli:main" in wheel_files[entry_points]
