#!/usr/bin/env bash
# One device run for issue 13 / 14.7a (<= 6 minutes on one H200): GPU decode tests, bench decode (graphs on/off,
# same-run floor), and the serving check (bench serve, then with a 64K prompt). See benchmarks/run_decode.py.
#   bash benchmarks/run_decode.sh OUTDIR            (add --cpu for a dry run of the script on CPU)
set -uo pipefail
if [ $# -lt 1 ]; then echo "usage: $0 OUTDIR [--cpu]" >&2; exit 2; fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
LIMIT=360                                   # the device budget of one call
for arg in "$@"; do [ "$arg" = "--cpu" ] && LIMIT=900; done
exec timeout -k 10 "$LIMIT" python3 benchmarks/run_decode.py "$@"
