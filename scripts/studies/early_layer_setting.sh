# Sourced by the early-layer study scripts: the setting they share, so they stay one study apart only
# in what they vary. SmolLM2-135M-Instruct (the eval default) on the `mixed` corpus, 300 documents per
# label, 16-token prompts and 24-token continuations, q_proj and v_proj of layers 0-3; the mixture
# generator (6 LoRA bases of rank 8, distance-routed by the mean input embedding as these studies ran,
# though `--routing auto` is the CLI's default now; trained per request) against
# the static LoRA of rank 48; warm-up, cosine decay and clipping at 1.0; seeds 0 1 2. Split by document,
# as these studies ran before the split by source existed (scripts/studies/protocol_study.sh splits by source).
EARLY_LAYER_SETTING=(
  --data mixed --max-per-label 300 --prompt-tokens 16 --continuation-tokens 24 --split-by document
  --targets 'model.layers.[0-3].self_attn.q_proj,model.layers.[0-3].self_attn.v_proj'
  --network mixture --bases 6 --rank 8 --routing distance --routing-sharpness 0.3 --train-k request
  --seeds 0 1 2 --eval-every 10 --patience 3
  --schedule cosine --warmup-steps 10 --clip-grad-norm 1.0
)

# The default recipe on top of it (docs/research/adaptation.md, "What the default is now"): the
# mixture's rank 48 as 12 bases of rank 4, 150 steps of 32 at lr 4e-3, the experts at 150 steps of 8.
DEFAULT_RECIPE=(--bases 12 --rank 4 --steps 150 --expert-steps 150 --lr 4e-3)

# reuse_if_present DIR: sets REUSE to `--reuse DIR` when that study directory exists (its runs are
# taken wherever every setting they depend on matches), to nothing otherwise.
reuse_if_present() {
  REUSE=()
  if [ -d "$1" ]; then REUSE=(--reuse "$1"); fi
}
