#!/usr/bin/env bash
# Fresh machine -> the import-layer contract (pyproject.toml [tool.importlinter]), then the whole CPU test
# suite (kernels run under TRITON_INTERPRET=1). Works from any folder: the repo is found from this file's path.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
lint-imports --no-cache
exec python -m pytest -q -p no:cacheprovider "$@"
