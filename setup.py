"""Package discovery only (metadata lives in pyproject.toml).

kernels/ is installed as ``lce.kernels`` and never as a top-level ``kernels`` package, which would shadow the PyPI
package of that name that transformers integrates; conf/ ships inside the package as ``lce.conf`` so Hydra finds it
(``pkg://lce.conf``) in editable and wheel installs alike.
"""

from setuptools import find_packages, setup

packages = (
    find_packages(include=["lce", "lce.*"])
    + ["lce.kernels"] + [f"lce.kernels.{p}" for p in find_packages("kernels")]
    + ["lce.conf"]
)
package_dir = {"lce": "lce", "lce.kernels": "kernels", "lce.conf": "conf"}

setup(packages=packages, package_dir=package_dir)
