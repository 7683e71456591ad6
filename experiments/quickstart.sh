#!/usr/bin/env bash
# Regenerates experiments/results/quickstart/: RoPE vs NoPE, tiny Llama trained at 128 tokens, evaluated to 32x.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
rm -rf outputs/quickstart
lce experiment=quickstart "$@"
dest=experiments/results/quickstart
mkdir -p "$dest"
cp outputs/quickstart/{results.jsonl,ppl_vs_length.csv,ppl_vs_length.png,nll_vs_position.png} "$dest/"
