#!/usr/bin/env bash
# Second command of the README: install everything and run the test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
source scripts/bootstrap.sh
exec python -m pytest -q -rs "$@"
