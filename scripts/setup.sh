#!/usr/bin/env bash
# Create .venv (if missing) and install dsaserve with pinned CPU torch. Sourced by demo.sh and test.sh.
# torch is pinned first: a bare "torch" requirement would pull a multi-GB CUDA build on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[serve,test]"
