"""Every lce package imports on its own, in a fresh interpreter: no import cycle among them (a cycle shows up as an
ImportError for whichever package happens to be imported first)."""

import pkgutil
import subprocess
import sys

import pytest

import lce
import lce.kernels


def packages(module) -> list[str]:
    return [f"{module.__name__}.{info.name}" for info in pkgutil.iter_modules(module.__path__) if info.ispkg]


PACKAGES = sorted(packages(lce) + packages(lce.kernels))  # lce.kernels is a namespace package: its subpackages


def test_the_packages_are_found():
    assert {"lce.attention", "lce.posenc", "lce.hf", "lce.eval", "lce.train", "lce.kernels.attention",
            "lce.kernels.rope"} <= set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_alone(package):
    result = subprocess.run([sys.executable, "-c", f"import {package}"], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
