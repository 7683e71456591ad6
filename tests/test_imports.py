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


#: Which lce packages each layer may import (besides lce.config, lce.errors, lce.registry, lce.deprecated and the
#: kernels, which sit below everything): core below posenc and attention, which know neither each other nor
#: transformers' internals (lce.hf).
ALLOWED = {
    "lce.core": set(),
    "lce.posenc": {"lce.core"},
    "lce.attention": {"lce.core"},
}
BELOW_ALL = {"lce.config", "lce.errors", "lce.registry", "lce.deprecated", "lce.kernels"}


def imported_modules(package: str) -> dict[str, set[str]]:
    """``{module file: modules it imports}`` for every module of ``package``, counting imports inside functions and
    ``TYPE_CHECKING`` blocks too, and the targets of deprecated aliases (``"lce.x.y.Name"`` strings)."""
    import ast
    import re
    from pathlib import Path

    root = Path(lce.__file__).parent / package.split(".", 1)[1]
    found = {}
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.update(re.findall(r"^(lce\.[a-z_]+)\.[a-z_.]+\.[A-Za-z_]+$", node.value))
        found[str(path)] = names
    return found


def imported_lce_packages(package: str) -> dict[str, set[str]]:
    """``imported_modules`` reduced to the other lce packages (``lce.hf``, ...)."""
    return {path: {".".join(n.split(".")[:2]) for n in names if n.startswith("lce.")} - {package}
            for path, names in imported_modules(package).items()}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_layers_import_only_what_is_below_them(package):
    for path, packages in imported_lce_packages(package).items():
        if package == "lce.attention" and path.endswith(("attention/plan.py", "attention/segments.py",
                                                          "attention/blockwise.py")):
            continue  # deprecated aliases of the modules that moved to lce.core (and lce.hf.dispatch)
        assert packages <= ALLOWED[package] | BELOW_ALL, f"{path} imports {sorted(packages - BELOW_ALL)}"


def test_core_knows_no_transformers():
    for path, modules in imported_modules("lce.core").items():
        assert not any(m.split(".")[0] == "transformers" for m in modules), path
