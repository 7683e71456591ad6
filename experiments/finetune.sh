#!/usr/bin/env bash
# Regenerates experiments/results/finetune/: a toy-scale reproduction of YaRN's core claim (arXiv:2309.00071 §4).
# The tiny Llama with RoPE trained at 64 tokens (finetune_base), then, all at scale s=16 and swept to 32x:
#   (a) training-free PI, NTK-aware and YaRN (finetune_training_free),
#   (b) PI fine-tuned and (c) YaRN fine-tuned at 1024 tokens with the same budget and optimiser (*_finetune_tiny).
# About 15 minutes on 2 shared CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
rm -rf outputs/finetune
lce experiment=finetune_base "$@"
lce experiment=finetune_training_free
lce experiment=pi_finetune_tiny
lce experiment=yarn_finetune_tiny
dest=experiments/results/finetune
mkdir -p "$dest"
cp outputs/finetune/{results.jsonl,ppl_vs_length.csv,ppl_vs_length.png,nll_vs_position.png} "$dest/"
for run in base pi-s16-ft yarn-s16-ft; do cp outputs/finetune/$run/train_log.jsonl "$dest/train_log_$run.jsonl"; done
