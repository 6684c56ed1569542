#!/usr/bin/env bash
# Create ./.venv with torch's CPU wheel installed FIRST (an unpinned torch would pull a multi-GB CUDA
# build), then optimum-mwanda in editable mode with the extras in $EXTRAS (default: demo,test).
#   bash scripts/setup_env.sh && . .venv/bin/activate
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-demo,test}"
VENV="${VENV:-.venv}"

python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[${EXTRAS}]"
echo "optimum-mwanda installed in $VENV (extras: $EXTRAS); activate with: . $VENV/bin/activate"
