#!/usr/bin/env bash
# Regenerates experiments/results/{quickstart,training_free}/:
#   quickstart: tiny Llama trained at 128 tokens with RoPE, NoPE and ALiBi, perplexity to 32x;
#   training_free: the RoPE model under every training-free method, perplexity to 32x.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
rm -rf outputs/quickstart outputs/training_free
start=$(date +%s)
lce experiment=quickstart "$@"
echo "quickstart: $(( $(date +%s) - start )) s"
lce experiment=training_free
echo "quickstart + training_free: $(( $(date +%s) - start )) s"
for name in quickstart training_free; do
  dest=experiments/results/$name
  mkdir -p "$dest"
  cp outputs/$name/{results.jsonl,ppl_vs_length.csv,ppl_vs_length.png,nll_vs_position.png} "$dest/"
done
