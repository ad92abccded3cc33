#!/usr/bin/env bash
# Create .venv (if missing) and install dsaserve with pinned CPU torch. Sourced by demo.sh and test.sh; works
# from any folder (the repo is found from this file's own path).
# torch is pinned first: a bare "torch" requirement would pull a multi-GB CUDA build on CPU machines.
# pip runs only when what it would install changed: .venv/.dsaserve-installed records the hash of
# pyproject.toml, the torch pin, the Python version and the repo path of the last successful install (and the
# installed torch must still be the pinned one). DSASERVE_REINSTALL=1 forces a reinstall.
set -euo pipefail
DSASERVE_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$DSASERVE_REPO"
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
STAMP=.venv/.dsaserve-installed
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
want="$(python -c 'import hashlib, sys; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest(), sys.version.split()[0])') torch==$TORCH_VERSION $DSASERVE_REPO"
have_torch="$(python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)"
if [ "${DSASERVE_REINSTALL:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
   && [ "${have_torch%%+*}" = "$TORCH_VERSION" ]; then
  echo "setup: .venv is up to date (pyproject.toml unchanged, torch $have_torch); skipping pip"
else
  rm -f "$STAMP"
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==$TORCH_VERSION"
  python -m pip install -q -e ".[serve,test]"
  echo "$want" > "$STAMP"
fi
