#!/usr/bin/env bash
# Regenerates experiments/results/{quickstart,training_free,retrieval}/:
#   quickstart: tiny Llama trained at 128 tokens with RoPE, NoPE and ALiBi, perplexity to 32x;
#   training_free: the RoPE model under every training-free method, perplexity to 32x;
#   retrieval: passkey and needle retrieval on the RoPE model (and its training-free variants) and the ALiBi model.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
rm -rf outputs/quickstart outputs/training_free outputs/retrieval
lce experiment=quickstart "$@"
lce experiment=training_free
lce experiment=retrieval
lce experiment=retrieval posenc=alibi run_name=alibi 'model.path=${out_root}/quickstart/alibi/model' 'eval.posencs=[]'
for name in quickstart training_free retrieval; do
  dest=experiments/results/$name
  mkdir -p "$dest"
  cp outputs/$name/{results.jsonl,ppl_vs_length.csv,ppl_vs_length.png,nll_vs_position.png} "$dest/"
done
cp outputs/retrieval/retrieval.jsonl outputs/retrieval/retrieval_*.png experiments/results/retrieval/
