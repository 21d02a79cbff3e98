#!/usr/bin/env bash
# Classifier routing (docs/adaptation.md, "Classifier routing"): the default recipe of
# scripts/routing_bases_study.sh (q/v of layers 0-3, 12 bases of rank 4, the mean input embedding,
# 150 steps, lr 4e-3, experts at 150 steps) with --routing classifier: a linear classifier of the
# statistic, fitted to the training labels and frozen, feeds the distance router, as the label oracle's
# one-hot rows did. Labels are used at training time only; the served artifact takes the statistic.
# Routing changes nothing the static LoRA or the experts see: with the 12-basis study's directory
# present their runs are taken from it and only the mixture trains.
# Resumable; parallel workers can share the directory (--only hyper|static|experts --seeds S).
# Copies the report to docs/results/classifier-routing/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.chameleon/studies}
source scripts/early_layer_setting.sh
chameleon fetch-corpora
reuse_if_present "$OUT/early-150-b12"
chameleon eval "${EARLY_LAYER_SETTING[@]}" "${DEFAULT_RECIPE[@]}" --routing classifier \
  --skip static-basis static-big --out "$OUT/early-150-b12-classifier" "${REUSE[@]}" "$@"
mkdir -p docs/results/classifier-routing
cp "$OUT/early-150-b12-classifier"/report.{json,md,png} docs/results/classifier-routing/
