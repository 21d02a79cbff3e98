#!/usr/bin/env bash
# Reproduces the real-data table of docs/research/results.md: SmolLM2-135M-Instruct, q_proj and v_proj
# of its last four layers at rank 8, on the Wikipedia-categories corpus and on BBC news; seeds 0 1 2.
# Resumable (re-run after an interruption). Each study writes report.json / report.md / report.png;
# they are copied to docs/research/results/<corpus>/. About 45 min per corpus on 2 cores when run one
# at a time.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-.chameleon/studies}
TARGETS='model.layers.2[6-9].self_attn.q_proj,model.layers.2[6-9].self_attn.v_proj'
# The paper's generator, as these studies ran (the CLI's defaults are now the mixture of
# docs/research/adaptation.md).
COMMON=(--targets "$TARGETS" --rank 8 --seeds 0 1 2 --steps 30 --eval-every 10 --lr 2e-3
  --network full --bases 1 --train-k auto --schedule constant --warmup-steps 0 --clip-grad-norm 0)

chameleon eval --data wiki-categories --drop-label Uncategorized --max-per-label 80 "${COMMON[@]}" \
  --out "$OUT/wiki-categories"
chameleon eval --data bbc-news --max-per-label 120 "${COMMON[@]}" --out "$OUT/bbc-news"

for corpus in wiki-categories bbc-news; do
  mkdir -p "docs/research/results/$corpus"
  cp "$OUT/$corpus"/report.{json,md,png} "docs/research/results/$corpus/"
done
