"""The wheel ships conf/ as lce.conf and kernels/ as lce.kernels, never a top-level ``kernels`` package; from the
repository root, ``import kernels`` is Hugging Face's package (a transformers 5.25 dependency), never lce's folder."""

import importlib.metadata
import subprocess
import sys
import textwrap
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


def test_the_bundled_harness_tasks_are_in_the_wheel(wheel_files):
    tasks = ROOT / "lce" / "eval" / "harness" / "tasks"
    shipped = {f"lce/eval/harness/tasks/{p.name}" for p in tasks.iterdir() if p.suffix in (".yaml", ".jsonl", ".py")}
    assert len(shipped) == 6 and shipped <= set(wheel_files)


def test_kernels_only_as_a_subpackage(wheel_files):
    assert "lce/kernels/backend.py" in wheel_files and "lce/kernels/attention/function.py" in wheel_files
    assert not any(name.startswith("kernels/") for name in wheel_files)


def test_the_repository_root_never_shadows_hugging_faces_kernels(tmp_path):
    """Python started in the repository root (``python -c``, ``python -m pytest``, a notebook) has the root first on
    ``sys.path``; transformers (which imports Hugging Face's ``kernels``), lce and lce.kernels must all import, and a
    model must save and load through ``from_pretrained``."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed (transformers < 5.25 does not require it)")
    script = textwrap.dedent(f"""
        import sys
        assert sys.path[0] in ("", {str(ROOT)!r}), sys.path[0]
        import transformers.modeling_utils, kernels, lce, lce.kernels.attention
        from pathlib import Path
        root = Path({str(ROOT)!r})
        assert not Path(kernels.__file__).resolve().is_relative_to(root), kernels.__file__
        assert hasattr(kernels, "get_kernel"), "not Hugging Face's kernels package"
        model, tokenizer = lce.load_model("tiny_llama", num_hidden_layers=1, hidden_size=32)
        lce.save_model(model, tokenizer, {str(tmp_path / "model")!r})
        reloaded, _ = lce.load_model({str(tmp_path / "model")!r})
        print(type(reloaded).__name__)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "LlamaForCausalLM"


def test_console_script(wheel_files):
    (entry_points,) = [n for n in wheel_files if n.endswith("entry_points.txt")]
    assert "lce = lce.cli:main" in wheel_files[entry_points]


def test_the_lowest_versions_ci_pins_are_the_claimed_lower_bounds():
    """``.ci/lowest.txt`` (the second CI run) pins every package at the lower bound pyproject.toml claims, so the
    claim is what is tested."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    requirements = [Requirement(r) for r in project["dependencies"] + extras]
    pins = {}
    for line in (ROOT / ".ci" / "lowest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip()] = Version(version)
    bounds: dict[str, Version] = {}
    for requirement in requirements:
        for spec in requirement.specifier:
            if spec.operator == ">=":
                # A package in two extras (gguf: real and test) must claim one lower bound.
                assert bounds.setdefault(requirement.name, Version(spec.version)) == Version(spec.version)
    assert bounds == pins
