#!/usr/bin/env bash
# Regenerates experiments/results/attention_sweep/: each attention variant (and one hybrid) trained at 128 tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
rm -rf outputs/attention_sweep
run() { lce experiment=attention_sweep "$@"; }
run attention=full
run attention=sliding_window attention.window=32
run attention=local_global attention.window=32 'attention.global_tokens=[0]'
run attention=block_sparse attention.block_size=16 attention.window_blocks=2 attention.global_blocks=1 attention.random_blocks=1
run attention=dilated attention.window=32 attention.dilation=2
run attention=s2_attn
run attention=linear_elu
run attention=linear_relu
run attention=performer
run attention=transnormer
run attention=retention
run attention=linear_elu attention.layers=every:2 run_name=hybrid_linear_elu_every2
dest=experiments/results/attention_sweep
mkdir -p "$dest"
cp outputs/attention_sweep/{results.jsonl,ppl_vs_length.csv,ppl_vs_length.png,nll_vs_position.png} "$dest/"
