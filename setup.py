"""Package discovery only (metadata lives in pyproject.toml).

kernels/ is installed as ``lce.kernels`` and never as a top-level ``kernels`` package: it has no ``__init__.py``, so
when the repository root is on ``sys.path`` (``python -c``, ``python -m pytest``, a notebook in the checkout) it is at
most a namespace portion, which Python passes over for Hugging Face's installed ``kernels`` package that transformers
imports (PEP 420), and ``lce/kernels`` is a symbolic link to it, so ``lce.kernels`` resolves inside ``lce`` in a
checkout, an editable install and a wheel alike. conf/ ships inside the package as ``lce.conf`` so Hydra finds it
(``pkg://lce.conf``) in editable and wheel installs alike.
"""

from setuptools import find_packages, setup

packages = (
    find_packages(include=["lce", "lce.*"])
    + ["lce.kernels"] + [f"lce.kernels.{p}" for p in find_packages("kernels")]
    + ["lce.conf"]
)
package_dir = {"lce": "lce", "lce.conf": "conf"}

setup(packages=packages, package_dir=package_dir)
