#!/usr/bin/env bash
# Issue #5 on a CUDA GPU: the kernel tests at real sizes and the benchmarks, written to
# experiments/results/kernels/<gpu>/ (then describe them in experiments/results/kernels/README.md: date, GPU, versions).
#
#   bash experiments/benchmarks/gpu.sh            # everything (about 20-30 minutes on an H200)
#   bash experiments/benchmarks/gpu.sh tests      # one part: tests | attention | backward | kernels
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")
out=experiments/results/kernels/$gpu
mkdir -p "$out"
parts=${1:-tests attention backward kernels}
shape="--dtype bfloat16 --head-dim 128 --heads 32 --kv-heads 8 --train-length 4096 --window 4096"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.csv"
python -c "import torch, triton, transformers; print(f'torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}, CUDA {torch.version.cuda}')" > "$out/versions.txt"

for part in $parts; do
  case $part in
    tests) python -m pytest -q -m gpu tests/kernels tests/attention 2>&1 | tee "$out/gpu_tests.txt" ;;
    attention) python experiments/benchmarks/attention.py $shape --lengths 8192 16384 32768 65536 --out "$out" ;;
    backward) python experiments/benchmarks/attention.py $shape --backward --lengths 8192 16384 32768 --out "$out" ;;
    kernels) python experiments/benchmarks/kernels.py --dtype bfloat16 --head-dim 128 --heads 32 --kv-heads 8 \
               --hidden 4096 --vocab 128256 --lengths 16384 65536 131072 --linear-lengths 4096 16384 65536 \
               --out "$out" ;;
    *) echo "unknown part '$part': choose tests, attention, backward or kernels" >&2; exit 2 ;;
  esac
done
echo "results in $out"
