#!/usr/bin/env bash
# The study behind Chameleon's step budget (docs/research/adaptation.md, "Equal training budgets"). The
# setting of scripts/studies/early_layer_study.sh at its chosen rate, 4e-3: SmolLM2-135M-Instruct on the `mixed`
# corpus, 300 documents per label, 16-token prompts and 24-token continuations, q_proj and v_proj of layers
# 0-3, the mixture generator (6 LoRA bases of rank 8) against the static LoRA of rank 48; warm-up, cosine
# decay and clipping at 1.0; seeds 0 1 2.
#
# The shared methods get 150 steps of 32 documents (4800 documents), the number of documents the six
# per-domain experts see in all at 100 steps of 8 (--expert-steps 100): no method trains on more text.
# Resumable: re-run after an interruption. Parallel workers can share the directory (--only).
# Copies report.{json,md,png} to docs/research/results/equal-budget/.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-.chameleon/studies}
source scripts/studies/early_layer_setting.sh
chameleon fetch-corpora
chameleon eval "${EARLY_LAYER_SETTING[@]}" \
  --steps 150 --expert-steps 100 --lr 4e-3 --skip static-basis --out "$OUT/early-150" "$@"
mkdir -p docs/research/results/equal-budget
cp "$OUT/early-150"/report.{json,md,png} docs/research/results/equal-budget/
