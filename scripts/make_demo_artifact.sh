#!/usr/bin/env bash
# Re-makes the trained artifact that `chameleon demo` serves (adapter_service/data/demo-artifact): the
# winner of docs/research/adaptation.md's study, which is also `chameleon train`'s default recipe. A
# mixture of 12 LoRA bases of rank 4 (rank 48 in all), trained per request, on q_proj and v_proj of
# SmolLM2-135M-Instruct's first four layers. The corpus is labelled, so `--routing auto` (the default)
# routes on the predicted label: a linear classifier of the mean input embedding, fitted to the training
# labels, picks the label whose adapter a request gets; serving needs no labels. Trained at lr 4e-3
# (the rate the study chose on validation), with warm-up, cosine decay and gradient clipping. The data is
# the `mixed` corpus, 300 documents per label, 16-token prompts and 24-token continuations; the demo's
# prompts come from the test split of the same corpus and split seed, never seen in training. This is
# the study's seed-0 run (scripts/studies/routing_variant_study.sh predicted-label: 150 steps, best validation
# 3.1567 at step 120). About 25 minutes on 2 idle cores.
set -euo pipefail
cd "$(dirname "$0")/.."
chameleon fetch-corpora
# The recipe is a file (adapter_service/training/recipes/demo.toml, the default recipe on `mixed`); the
# artifact's manifest names it. `chameleon train --config demo --print-config` shows every value.
exec chameleon train --config demo --out adapter_service/data/demo-artifact "$@"
