#!/usr/bin/env bash
# Fresh machine -> the PP2 x CP2 CPU demo on a tiny built-in DeepSeek-V3.2 model (4 processes, gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
exec dsaserve demo "$@"
