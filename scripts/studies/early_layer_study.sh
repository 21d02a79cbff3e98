#!/usr/bin/env bash
# The study behind Chameleon's defaults (docs/research/adaptation.md, "Every method's learning rate chosen on
# validation"). SmolLM2-135M-Instruct on the `mixed` corpus, 300 documents per label, 16-token prompts
# and 24-token continuations, q_proj and v_proj of layers 0-3. Chameleon is the mixture generator: 6
# LoRA bases of rank 8, routed by the mean input embedding, trained per request. It is compared with
# the static LoRA of rank 48 (= its parameters). Every method is trained at lr 2e-3, 4e-3 and 8e-3, and
# takes the rate with its best validation NLL, per seed. All use warm-up, cosine decay and clipping at
# 1.0; seeds 0 1 2.
#
# The experts are left out here (`--skip experts`, see docs/research/adaptation.md for their headroom); drop
# that flag to train them at every rate too, which costs about 3 hours more on 2 cores.
# Resumable: re-run after an interruption. Parallel workers can share the directory (--only).
# Copies report.{json,md,png} to docs/research/results/early-lrs/.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-.chameleon/studies}
source scripts/studies/early_layer_setting.sh
chameleon fetch-corpora
chameleon eval "${EARLY_LAYER_SETTING[@]}" --skip static-basis experts \
  --steps 100 --lr 2e-3 4e-3 8e-3 --out "$OUT/early-stable-lrs" "$@"
mkdir -p docs/research/results/early-lrs
cp "$OUT/early-stable-lrs"/report.{json,md,png} docs/research/results/early-lrs/
