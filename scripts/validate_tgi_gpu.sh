#!/usr/bin/env bash
# Validate chameleon_tgi inside the real TGI 3.3.7 image, on a GPU host with docker and the NVIDIA
# container toolkit. NOT RUN YET: it was written on a machine without a GPU, where the plugin was only
# tested against a stand-in of TGI (tests/plugins/tgi_standin). Run it before trusting the plugin in production.
#
#   MODEL_ID=TinyLlama/TinyLlama-1.1B-Chat-v1.0 bash scripts/validate_tgi_gpu.sh
#
# It builds both images, makes a random-init artifact for MODEL_ID (non-zero deltas) unless
# CHAMELEON_ARTIFACT points at one, starts sidecar + TGI (compose), sends a mixed concurrent batch with
# huggingface_hub's InferenceClient (three topics, plus requests that opt out with adapter_id
# "__base_model__"), checks the shard registered adapters (log line and the plugin's metrics, no
# fallback), then runs the same requests with CHAMELEON_TGI=0 and checks that adapted outputs differ and
# opted-out ones do not. Pick a model whose projection widths are in the BGMV kernel's whitelist
# (plugins/chameleon_tgi/TGI_INTERNALS.md, section 4): TinyLlama's 2048/256 are; SmolLM2-135M's
# 576/192 are not.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WORK:-${TMPDIR:-/tmp}/chameleon-tgi-validation}"
MODEL_ID="${MODEL_ID:-TinyLlama/TinyLlama-1.1B-Chat-v1.0}"
COMPOSE=(docker compose -f "$ROOT/deploy/tgi/compose.yaml")
export MODEL_ID HF_CACHE="${HF_CACHE:-$WORK/data}" TGI_PORT="${TGI_PORT:-8080}"
mkdir -p "$WORK" "$HF_CACHE"

fail() { echo "FAIL: $*" >&2; "${COMPOSE[@]}" logs --tail 200 tgi > "$WORK/tgi.log" 2>&1 || true; exit 1; }
command -v docker >/dev/null || fail "docker is not installed"
nvidia-smi >/dev/null 2>&1 || fail "no NVIDIA GPU visible (nvidia-smi failed)"

echo "== 1. images"
export CHAMELEON_ARTIFACT="${CHAMELEON_ARTIFACT:-$WORK/artifact}"
mkdir -p "$CHAMELEON_ARTIFACT"
"${COMPOSE[@]}" build

echo "== 2. artifact for $MODEL_ID"
if [[ ! -f "$CHAMELEON_ARTIFACT/manifest.json" ]]; then
  "${COMPOSE[@]}" run --rm --no-deps -T -e HF_TOKEN="${HF_TOKEN:-}" -v "$CHAMELEON_ARTIFACT:/out" sidecar \
    chameleon export --model "$MODEL_ID" --targets q_proj,v_proj --rank 8 --init random --out /out
fi

# The client runs in the sidecar image (it has huggingface_hub), on the compose network.
client() {
  "${COMPOSE[@]}" run --rm --no-deps -T -v "$WORK:/work" sidecar python - "$@"
}

run_requests() {  # $1: output file name under $WORK
  client "/work/$1" <<'PY'
import json, sys
from concurrent.futures import ThreadPoolExecutor
from huggingface_hub import InferenceClient

client = InferenceClient(base_url="http://tgi:80")
topics = [
    "Write a short poem about the sea and the harbour at night.",
    "Explain how a hash map handles collisions, step by step.",
    "List the main causes of the French Revolution.",
]
jobs = [(f"{t} (variant {v})", None) for v in range(3) for t in topics]
jobs += [(topics[0], "__base_model__"), (topics[1], "__base_model__")]

def ask(job):
    prompt, adapter_id = job
    kwargs = {"adapter_id": adapter_id} if adapter_id else {}
    return client.text_generation(prompt, max_new_tokens=24, do_sample=False, **kwargs)

with ThreadPoolExecutor(len(jobs)) as pool:  # concurrent: TGI batches them together
    outputs = list(pool.map(ask, jobs))
json.dump([{"prompt": p, "adapter_id": a, "output": o} for (p, a), o in zip(jobs, outputs)], open(sys.argv[1], "w"), indent=1)
print(f"{len(outputs)} answers")
PY
}

wait_healthy() {
  for _ in $(seq 1 180); do
    if curl -fsS "http://127.0.0.1:$TGI_PORT/health" >/dev/null 2>&1; then return 0; fi
    sleep 5
  done
  fail "TGI did not become healthy in 15 minutes (see $WORK/tgi.log)"
}

echo "== 3. TGI with Chameleon"
CHAMELEON_TGI=1 "${COMPOSE[@]}" up -d --force-recreate
wait_healthy
run_requests with.json
"${COMPOSE[@]}" logs tgi > "$WORK/tgi-with.log" 2>&1
grep -q "chameleon_tgi installed" "$WORK/tgi-with.log" || fail "no 'chameleon_tgi installed' line in the shard log"
grep -q "chameleon attached" "$WORK/tgi-with.log" || fail "no 'chameleon attached' line in the shard log"
"${COMPOSE[@]}" exec -T tgi /usr/src/.venv/bin/python - <<'PY' || fail "the plugin's metrics do not show adapted batches without fallback"
import urllib.request
text = urllib.request.urlopen("http://127.0.0.1:9465/metrics").read().decode()
open("/data/chameleon-metrics.txt", "w").write(text)
def value(name):
    return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name))
adapted = value('chameleon_plugin_batches_total{outcome="adapted"}')
fallbacks = value("chameleon_plugin_fallbacks_total")
clusters = value('chameleon_tgi_requests_total{outcome="cluster"}')
print(f"adapted batches {adapted}, requests on clusters {clusters}, fallbacks {fallbacks}")
assert adapted >= 1 and clusters >= 9 and fallbacks == 0
PY

echo "== 4. the same requests on plain TGI (CHAMELEON_TGI=0)"
CHAMELEON_TGI=0 "${COMPOSE[@]}" up -d --force-recreate tgi
wait_healthy
run_requests without.json
"${COMPOSE[@]}" logs tgi > "$WORK/tgi-without.log" 2>&1
if grep -q "chameleon_tgi installed" "$WORK/tgi-without.log"; then fail "CHAMELEON_TGI=0 still installed the plugin"; fi

echo "== 5. compare"
python3 - "$WORK/with.json" "$WORK/without.json" <<'PY' || fail "outputs do not show the adapters (see the files above)"
import json, sys
with_, without = (json.load(open(p)) for p in sys.argv[1:3])
changed = [a["prompt"] for a, b in zip(with_, without) if a["adapter_id"] is None and a["output"] != b["output"]]
opted = [(a["output"] == b["output"]) for a, b in zip(with_, without) if a["adapter_id"] == "__base_model__"]
print(f"adapted requests whose output changed: {len(changed)} of 9; opted-out unchanged: {sum(opted)} of {len(opted)}")
if not all(opted):  # the identity adapter adds exact zeros, but batching can still move bf16 rounding
    print("WARNING: an opted-out request changed; compare with a second CHAMELEON_TGI=0 run before concluding")
assert changed
PY
"${COMPOSE[@]}" down
echo "PASS: chameleon_tgi registered adapters in TGI and changed the outputs (details in $WORK)"
