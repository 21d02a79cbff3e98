#!/usr/bin/env bash
# The study behind the default's 12 LoRA bases of rank 4 (docs/research/adaptation.md, "Closing the gap at
# equal steps"): the setting of scripts/studies/equal_budget_study.sh (150 steps of 32, lr 4e-3, seeds 0 1 2) with
# the mixture's rank 48 split into 12 bases of rank 4 instead of 6 of rank 8, against the same static LoRA
# of rank 48 and the same per-domain experts (6 of rank 8: the rank shared out over the labels), here given
# as many steps as the shared methods (--expert-steps 150). Routing settings change nothing the static LoRA
# or the experts see, so with the equal-steps study's directory present (docs/research/adaptation.md gives
# its command) their runs are taken from it and only the mixture trains. The static LoRA of the mixture's
# exact parameter count (rank 49) is trained too.
# A second study is the diagnostic of why the share stops where it does: the same mixture routed on each
# prompt's domain label (--oracle-statistic) instead of its statistic, with every baseline reused.
# A third gathers the static LoRA and the mixture over 5 seeds (no experts: their seeds stay at 3), for an
# interval over seeds and documents that is not a bootstrap of 3 runs.
# Resumable: re-run after an interruption. Parallel workers can share a directory (--only).
# Copies the reports to docs/research/results/finer-bases/ (report.*, oracle.*, seeds.*).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-.chameleon/studies}
source scripts/studies/early_layer_setting.sh
chameleon fetch-corpora
reuse_if_present "$OUT/early-150-experts150"
chameleon eval "${EARLY_LAYER_SETTING[@]}" "${DEFAULT_RECIPE[@]}" --skip static-basis \
  --out "$OUT/early-150-b12" "${REUSE[@]}" "$@"
chameleon eval "${EARLY_LAYER_SETTING[@]}" "${DEFAULT_RECIPE[@]}" --skip static-basis static-big \
  --oracle-statistic --out "$OUT/early-150-b12-oracle" --reuse "$OUT/early-150-b12" "$@"
chameleon eval "${EARLY_LAYER_SETTING[@]}" --bases 12 --rank 4 --seeds 0 1 2 3 4 \
  --steps 150 --lr 4e-3 --skip static-basis static-big experts \
  --out "$OUT/early-150-b12-seeds" --reuse "$OUT/early-150-b12" "$@"
mkdir -p docs/research/results/finer-bases
cp "$OUT/early-150-b12"/report.{json,md,png} docs/research/results/finer-bases/
for study in oracle seeds; do
  for ext in json md png; do
    cp "$OUT/early-150-b12-$study/report.$ext" "docs/research/results/finer-bases/$study.$ext"
  done
done
