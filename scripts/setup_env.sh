#!/usr/bin/env bash
# Create ./.venv with torch==2.13.0 installed FIRST, then optimum-mwanda in editable mode with the extras in
# $EXTRAS (default: demo,test). On our CPU machines the pin resolves to a local CPU wheel (an unpinned torch
# would pull a multi-GB CUDA build); elsewhere it is PyPI's build of that version (CUDA on Linux x86-64,
# what a GPU machine wants). Set TORCH_SPEC to install another torch, e.g. TORCH_SPEC="torch==2.13.0+cpu".
#   bash scripts/setup_env.sh && . .venv/bin/activate
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-demo,test}"
VENV="${VENV:-.venv}"

python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
"$VENV/bin/python" -m pip install --quiet -e ".[${EXTRAS}]"
echo "optimum-mwanda installed in $VENV (extras: $EXTRAS); activate with: . $VENV/bin/activate"
