#!/usr/bin/env bash
# The default recipe's study under the protocol of docs/research/protocol.md, fixed before any of it ran:
#   - the `mixed` corpus split by source (a KJV book, a fortune file, a dictionary's letter section never
#     in two splits), split seed 0; SmolLM2-135M-Instruct, q/v of layers 0-3, 12 bases of rank 4,
#     150 steps of 32 (experts: 150 steps of 8 each), warm-up, cosine decay, clipping at 1.0;
#   - seeds 0 1 2, no more: further seeds go to another directory and are reported as an addition;
#   - every method, the experts included, takes its learning rate from 2e-3 4e-3 8e-3 on validation;
#   - the routings compared on validation as served (per request, and k <= 8 as vLLM and TGI serve):
#     predicted-label and classifier (labels at training time) and pseudo-label (no labels anywhere).
# Each routing has its own directory; the static LoRAs and experts train once, in the first, and the
# others take them (--reuse), so each directory holds every run its report and headroom share use.
# Resumable (a cut run from its last validation); workers can share a directory (--only NAME --seeds S).
#   scripts/studies/protocol_study.sh predicted-label|classifier|pseudo-label [chameleon eval arguments]
# A variant of the setting (other eval arguments) gets its own directories with TAG=NAME, under the
# same rules; the follow-ups fixed in docs/research/protocol.md:
#   TAG=prompt64 scripts/studies/protocol_study.sh predicted-label|pseudo-label --prompt-tokens 64
#   TAG=traffic-encoder scripts/studies/protocol_study.sh predicted-label|pseudo-label \
#     --data traffic --statistic encoder
set -euo pipefail
cd "$(dirname "$0")/../.."
routing=${1:?usage: scripts/studies/protocol_study.sh predicted-label|classifier|pseudo-label [eval arguments]}
shift
OUT=${OUT:-.chameleon/studies}
source scripts/studies/early_layer_setting.sh
chameleon fetch-corpora
suffix=${TAG:+-$TAG}
first="$OUT/protocol-predicted-label$suffix"
REUSE=()
if [ "$routing" != predicted-label ] && [ -d "$first" ]; then REUSE=(--reuse "$first"); fi
chameleon eval "${EARLY_LAYER_SETTING[@]}" "${DEFAULT_RECIPE[@]}" --split-by source --seeds 0 1 2 \
  --lr 2e-3 4e-3 8e-3 --routing "$routing" --skip static-basis static-big \
  --out "$OUT/protocol-$routing$suffix" "${REUSE[@]}" "$@"
