#!/usr/bin/env bash
# Build the folder of wheels that gpu.sh installs lce's missing requirements from on a GPU machine without network
# (the benchmark image: Python 3.12, x86-64, torch and Triton installed). Run it where pip reaches PyPI, from any
# directory; nothing is installed here. Then carry the folder along (it is not committed: keep it out of git).
#
#   bash experiments/benchmarks/gpu_wheels.sh [--full] [--python-version 3.12] [DIR]     (default DIR: .whl)
#
# In the folder: what lce needs at run time and the image lacks or has too old (transformers >= 5.20 with Hugging
# Face's `kernels` and huggingface-hub 2.x, hydra-core, omegaconf, antlr4-python3-runtime (built here: PyPI has only
# its source), hydra-submitit-launcher, submitit), everything they need in turn, setuptools and wheel (to build lce)
# and pip. Versions: those installed in this Python (${PYTHON:-python3}), i.e. what lce is tested with here, else lce's
# pyproject.toml ranges. Wheels of numpy, pandas, pyarrow and tokenizers are dropped: the image has versions that
# satisfy them, and they are big. The benchmarks' peers come as wheels without their dependencies (which would pull
# torch and Triton: the image has them): liger-kernel, flash-linear-attention with fla-core, and einops (about 2.5 MB;
# flash-attn has no wheel on PyPI for the image's torch/CUDA, so gpu.sh records it as unavailable). --full adds
# datasets and wandb (training and evaluation runs, not gpu.sh's parts): about 23 MB more. The device tool carries
# at most 64 MiB with the working tree: the default folder is about 35 MB.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
full=
python_version=3.12
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --full) full=1; shift ;;
    --python-version) python_version=$2; shift 2 ;;
    -*) echo "gpu_wheels.sh: unknown option '$1'" >&2; exit 2 ;;
    *) break ;;
  esac
done
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
dir=${1:-$repo/.whl}
py=${PYTHON:-python3}
mkdir -p "$dir"

names=(transformers kernels huggingface-hub hydra-core omegaconf hydra-submitit-launcher submitit)
[ -n "$full" ] && names+=(datasets wandb)
# "name==version" where this Python has the package, else lce's own requirement (pyproject.toml) or the bare name.
mapfile -t reqs < <("$py" - "$repo/pyproject.toml" "${names[@]}" <<'EOF'
import sys, tomllib
from importlib import metadata
from packaging.requirements import Requirement

declared = {Requirement(r).name: r for r in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]}
for name in sys.argv[2:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(declared.get(name, name))
EOF
)
reqs+=("setuptools>=77" wheel pip)  # lce's build-system requirements, and pip
echo "requirements: ${reqs[*]}"

# Source-only on PyPI: build the (pure-Python) wheel here; hydra-core and omegaconf pin it to 4.9.*.
"$py" -m pip wheel --no-deps --wheel-dir "$dir" "antlr4-python3-runtime==4.9.3"

platforms=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for minor in $(seq 17 39); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
abi=cp${python_version/./}
"$py" -m pip download --dest "$dir" --find-links "$dir" --only-binary=:all: --python-version "$python_version" \
  --implementation cp --abi "$abi" --abi abi3 --abi none "${platforms[@]}" "${reqs[@]}"

# The peers, pinned to the versions the benchmarks were written against.
"$py" -m pip download --dest "$dir" --no-deps --only-binary=:all: --python-version "$python_version" \
  --implementation cp --abi "$abi" --abi abi3 --abi none "${platforms[@]}" \
  liger-kernel==0.8.5 flash-linear-attention==0.6.0 fla-core==0.6.0 einops==0.8.2

for big in numpy pandas pyarrow tokenizers; do
  rm -f "$dir/$big"-*.whl
done
echo "wheels in $dir: $(find "$dir" -name '*.whl' | wc -l), $(du -sh "$dir" | cut -f1)"
