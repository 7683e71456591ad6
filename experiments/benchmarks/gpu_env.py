"""What ``gpu.sh`` asks of a Python environment before it runs lce's GPU checks (standard library + ``packaging``).

    python3 experiments/benchmarks/gpu_env.py check REPO     # exit 0 iff lce imports from REPO with its requirements
    python3 experiments/benchmarks/gpu_env.py unmet REPO     # lce's unmet requirements, one per line (pip syntax)
    python3 experiments/benchmarks/gpu_env.py versions REPO  # what the checks ran on: Python, torch/CUDA, Triton, ...
    python3 experiments/benchmarks/gpu_env.py peers REPO     # the benchmarks' peers not installed, one per line

The requirements are ``[project].dependencies`` of ``REPO/pyproject.toml`` (markers evaluated here) plus pytest,
which the ``tests`` part needs, less what the GPU image supplies whatever its version (torch and Triton: lce's
kernels work on Triton 3.6 to 3.9, and the image's CUDA build of torch is the one to measure) and what no part of
``gpu.sh`` imports (datasets, wandb); "met" means installed at a version the specifier allows, as pip would judge it.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from packaging.requirements import Requirement

#: Needed by gpu.sh itself (the tests part), not by lce at run time.
EXTRA_REQUIREMENTS = ["pytest>=8"]
#: Taken from the GPU image as they are (never installed over it).
FROM_IMAGE = {"torch", "triton"}
#: lce requirements that no part of gpu.sh imports (training and evaluation runs need them).
NOT_NEEDED = {"datasets", "wandb"}
#: The benchmarks' peers (import name, distribution): installed from the wheel folder when there.
PEERS = {"liger_kernel": "liger-kernel", "fla": "flash-linear-attention", "flash_attn": "flash-attn"}


def requirements(repo: Path) -> list[Requirement]:
    """lce's runtime requirements that apply to this interpreter, and pytest."""
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in [*project["dependencies"], *EXTRA_REQUIREMENTS]]
    return [r for r in reqs if (r.marker is None or r.marker.evaluate()) and r.name not in FROM_IMAGE | NOT_NEEDED]


def missing_peers() -> list[str]:
    """The peers' distributions that are not installed."""
    return [dist for module, dist in PEERS.items() if importlib.util.find_spec(module) is None]


def unmet(repo: Path) -> list[str]:
    """The requirements not installed at an allowed version (pre-releases allowed: a nightly torch counts)."""
    missing = []
    for req in requirements(repo):
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(str(req))
            continue
        if not req.specifier.contains(version, prereleases=True):
            missing.append(str(req))
    return missing


def lce_problems(repo: Path) -> list[str]:
    """Why ``lce`` (with ``lce.kernels`` and its configs, ``lce.conf``) does not import from ``repo``; [] if it does."""
    try:
        lce = importlib.import_module("lce")
        for name in ("lce.kernels", "lce.conf"):
            importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - an ImportError, or whatever a broken dependency raises
        return [f"import lce, lce.kernels, lce.conf failed: {type(error).__name__}: {error}"]
    where = Path(lce.__file__).resolve().parent
    if where != (repo / "lce").resolve():
        return [f"lce is imported from {where}, not from this checkout ({repo})"]
    return []


def check(repo: Path) -> int:
    problems = lce_problems(repo) + [f"unmet requirement: {r}" for r in unmet(repo)]
    print(f"{sys.executable}: " + ("lce and all its requirements are installed" if not problems else
                                   "\n  ".join(["not usable as it is:", *problems])))
    return 1 if problems else 0


def versions(repo: Path) -> None:
    print(f"python {platform.python_version()} ({sys.executable}), {platform.platform()}")
    try:
        import torch

        print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
              f"CUDA available: {torch.cuda.is_available()}")
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i} {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                  f"sm_{props.major}{props.minor}, {props.multi_processor_count} SMs")
    except Exception as error:  # noqa: BLE001 - a report: say what broke and go on
        print(f"torch: {type(error).__name__}: {error}")
    names = {r.name for r in requirements(repo)} | FROM_IMAGE | NOT_NEEDED | set(PEERS.values())
    for name in sorted(names | {"lce", "kernels", "huggingface-hub", "numpy", "einops", "fla-core"}):
        try:
            print(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            print(f"{name}: not installed")
    try:
        rev = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"], check=False,
                             capture_output=True, text=True, timeout=30)
        print(f"lce checkout {repo}: {rev.stdout.strip() or 'no git metadata'}")
    except (OSError, subprocess.TimeoutExpired):
        print(f"lce checkout {repo}: no git")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("check", "unmet", "versions", "peers"):
        print(__doc__, file=sys.stderr)
        return 2
    command, repo = argv[0], Path(argv[1]).resolve()
    if command == "check":
        return check(repo)
    if command in ("unmet", "peers"):
        for requirement in unmet(repo) if command == "unmet" else missing_peers():
            print(requirement)
    else:
        versions(repo)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
