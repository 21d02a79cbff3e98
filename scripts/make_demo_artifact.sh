#!/usr/bin/env bash
# Re-makes the trained artifact that `chameleon demo` serves (adapter_service/data/demo-artifact):
# a hyper-network for SmolLM2-135M-Instruct, q_proj and v_proj of its last four layers, rank 8,
# trained on the mixed Wikipedia-categories + BBC-news preset (the demo's prompts come from the
# test split of the same preset and split seed, never seen in training). About 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
exec chameleon train \
  --model smollm2-135m-instruct \
  --data wiki+bbc --drop-label wiki/Uncategorized --max-per-label 80 --split-seed 0 \
  --targets 'model.layers.2[6-9].self_attn.q_proj,model.layers.2[6-9].self_attn.v_proj' \
  --rank 8 --hidden 64 --kind hyper --batching mixed --max-k 8 \
  --steps 60 --eval-every 10 --patience 3 --lr 1e-3 --seed 0 \
  --out adapter_service/data/demo-artifact "$@"
