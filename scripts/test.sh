#!/usr/bin/env bash
# The test command (CI runs it): set up .venv with the test extras and vLLM's CPU build (its plugin is
# tested against a real engine), lint, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh cpu,test,vllm
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
