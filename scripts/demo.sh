#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then run `chameleon demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh cpu,train
exec .venv/bin/chameleon demo "$@"
