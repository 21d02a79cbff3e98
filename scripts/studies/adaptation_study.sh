#!/usr/bin/env bash
# The late-layer study of docs/research/adaptation.md: where does per-cluster adaptation pay?
# SmolLM2-135M-Instruct on the `mixed` corpus (encyclopedia, news, scripture, fortunes, dictionary,
# computing glossary), q_proj and v_proj of the last four layers. Chameleon = the mixture generator (6 LoRA
# bases of rank 8, routed by the mean input embedding, per request in training) against static LoRAs of rank
# 8 and 48 (= its parameters) and oracle per-domain experts of rank 8 (together = its parameters);
# seeds 0 1 2. The schedule and routing as they ran (constant lr, no clipping, distance routing; the CLI's
# defaults changed since).
# Resumable: re-run after an interruption. Copies report.{json,md,png} to
# docs/research/results/adaptation/.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-.chameleon/studies}
chameleon fetch-corpora
chameleon eval --data mixed --max-per-label 200 \
  --targets 'model.layers.2[6-9].self_attn.q_proj,model.layers.2[6-9].self_attn.v_proj' \
  --network mixture --bases 6 --rank 8 --routing distance --routing-sharpness 0.3 --train-k request \
  --seeds 0 1 2 --steps 100 --eval-every 10 --patience 3 --lr 2e-3 \
  --schedule constant --warmup-steps 0 --clip-grad-norm 0 \
  --out "$OUT/adaptation-mixture" "$@"
mkdir -p docs/research/results/adaptation
cp "$OUT/adaptation-mixture"/report.{json,md,png} docs/research/results/adaptation/
