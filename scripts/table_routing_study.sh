#!/usr/bin/env bash
# Table routing (docs/adaptation.md, "Table routing"): the default recipe of
# scripts/routing_bases_study.sh (q/v of layers 0-3, 12 bases of rank 4, the mean input embedding,
# 150 steps, lr 4e-3, experts at 150 steps) with --routing table: the nearest of 12 fixed k-means
# prototypes picks a learned row of basis weights, so all requests of one group share their adapter
# exactly, as under the label oracle. Routing changes nothing the static LoRA or the experts see: with
# the 12-basis study's directory present their runs are taken from it and only the mixture trains.
# Resumable; parallel workers can share the directory (--only hyper --seeds S).
# Copies the report to docs/results/table-routing/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.chameleon/studies}
source scripts/early_layer_setting.sh
chameleon fetch-corpora
reuse_if_present "$OUT/early-150-b12"
chameleon eval "${EARLY_LAYER_SETTING[@]}" "${DEFAULT_RECIPE[@]}" --routing table \
  --skip static-basis static-big --out "$OUT/early-150-b12-table" "${REUSE[@]}" "$@"
mkdir -p docs/results/table-routing
cp "$OUT/early-150-b12-table"/report.{json,md,png} docs/results/table-routing/
