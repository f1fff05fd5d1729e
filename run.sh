#!/usr/bin/env bash
# First command of the README: install everything, meta-train a learned optimizer on the
# default offline task family, then evaluate it against tuned Adam and print the table.
# Extra arguments are config overrides, e.g. `bash run.sh meta.outer_steps=50`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
source scripts/bootstrap.sh
exec lopt train --config configs/default.toml "$@"
