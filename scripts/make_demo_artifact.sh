#!/usr/bin/env bash
# Re-makes the trained artifact that `chameleon demo` serves (adapter_service/data/demo-artifact): the
# default generator of `chameleon train` (the mixture of docs/adaptation.md: 6 LoRA bases of rank 8,
# soft-routed by the mean input embedding, trained per request) for SmolLM2-135M-Instruct, q_proj and
# v_proj of its last four layers, on the `mixed` corpus (the demo's prompts come from the test split of
# the same corpus and split seed, never seen in training). About 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
chameleon fetch-corpora
exec chameleon train \
  --model smollm2-135m-instruct \
  --data mixed --max-per-label 200 --split-seed 0 \
  --targets 'model.layers.2[6-9].self_attn.q_proj,model.layers.2[6-9].self_attn.v_proj' \
  --network mixture --bases 6 --rank 8 --routing-sharpness 0.3 --train-k request \
  --kind hyper --batching mixed \
  --steps 100 --eval-every 10 --patience 3 --lr 2e-3 --seed 0 \
  --out adapter_service/data/demo-artifact "$@"
