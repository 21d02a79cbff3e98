#!/usr/bin/env bash
# A routing variant of the default recipe (docs/research/adaptation.md, "Table routing" and "Classifier
# routing"): scripts/studies/routing_bases_study.sh's setting (q/v of layers 0-3, 12 bases of rank 4, the mean
# input embedding, 150 steps, lr 4e-3, experts at 150 steps) with --routing ROUTING:
#   table       the nearest of 12 fixed k-means prototypes picks a learned row of basis weights, so all
#               requests of one group share their adapter exactly, as under the label oracle;
#   classifier  a linear classifier of the statistic, fitted to the training labels and frozen, feeds
#               the distance router, as the oracle's one-hot labels did (labels at training time only;
#               the served artifact takes the statistic alone);
#   predicted-label  the same classifier, but the router sees only its predicted label, one-hot, as the
#               oracle saw the true one.
# Routing changes nothing the static LoRA or the experts see: with the 12-basis study's directory
# present their runs are taken from it and only the mixture trains.
# Resumable; parallel workers can share the directory (--only hyper|static|experts --seeds S).
# Copies the report to docs/research/results/ROUTING-routing/.
#   scripts/studies/routing_variant_study.sh table|classifier|predicted-label [chameleon eval arguments]
set -euo pipefail
cd "$(dirname "$0")/../.."
routing=${1:?usage: scripts/studies/routing_variant_study.sh table|classifier|predicted-label [chameleon eval arguments]}
shift
OUT=${OUT:-.chameleon/studies}
source scripts/studies/early_layer_setting.sh
chameleon fetch-corpora
reuse_if_present "$OUT/early-150-b12"
chameleon eval "${EARLY_LAYER_SETTING[@]}" "${DEFAULT_RECIPE[@]}" --routing "$routing" \
  --skip static-basis static-big --out "$OUT/early-150-b12-$routing" "${REUSE[@]}" "$@"
mkdir -p "docs/research/results/$routing-routing"
cp "$OUT/early-150-b12-$routing"/report.{json,md,png} "docs/research/results/$routing-routing/"
