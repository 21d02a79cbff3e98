#!/usr/bin/env bash
# The statistic the label oracle asked for (docs/research/adaptation.md, "A better statistic: the hidden state
# after layer 4"): the default recipe of scripts/studies/routing_bases_study.sh (q/v of layers 0-3, 12 bases of
# rank 4, 150 steps, lr 4e-3, experts at 150 steps) routed on the mean hidden state after decoder layer 4
# of the base model (--statistic hidden:4) instead of the mean input embedding. The adapted layers come
# before layer 4, so serving pays a separate pass of 4 of the 30 layers over the prompt. The statistic
# changes nothing the static LoRA or the experts see: with the 12-basis study's directory present their
# runs are taken from it and only the mixture trains. A second study tries layer 8 on seed 0.
# Then benchmarks/statistic_grouping.py --router-view scores what a router can get from each statistic
# in this setting. Resumable; parallel workers can share a directory (--only hyper --seeds S).
# Copies the reports to docs/research/results/hidden-statistic/ (report.*, layer8.*,
# statistic_grouping_mixed16.*).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-.chameleon/studies}
source scripts/studies/early_layer_setting.sh
chameleon fetch-corpora
reuse_if_present "$OUT/early-150-b12"
chameleon eval "${EARLY_LAYER_SETTING[@]}" "${DEFAULT_RECIPE[@]}" --statistic hidden:4 \
  --skip static-basis static-big --out "$OUT/early-150-b12-hidden4" "${REUSE[@]}" "$@"
chameleon eval "${EARLY_LAYER_SETTING[@]}" "${DEFAULT_RECIPE[@]}" --statistic hidden:8 --seeds 0 \
  --skip static-basis static-big --out "$OUT/early-150-b12-hidden8" "${REUSE[@]}" "$@"
mkdir -p docs/research/results/hidden-statistic
cp "$OUT/early-150-b12-hidden4"/report.{json,md,png} docs/research/results/hidden-statistic/
for ext in json md png; do
  cp "$OUT/early-150-b12-hidden8/report.$ext" "docs/research/results/hidden-statistic/layer8.$ext"
done
python benchmarks/statistic_grouping.py --data mixed --max-per-label 300 --prompt-tokens 16 \
  --continuation-tokens 24 --layers 1 2 4 8 12 --router-view --bases 12 \
  --artifact adapter_service/data/demo-artifact --out docs/research/results/hidden-statistic --tag mixed16
