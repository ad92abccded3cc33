#!/usr/bin/env bash
# Fresh machine -> the PP2 x CP2 CPU demo on a tiny built-in DeepSeek-V3.2 model (4 processes, gloo).
# Works from any folder: the repo is found from this file's path.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
exec dsaserve demo "$@"
