#!/usr/bin/env bash
# The project as a user installs it: builds the wheel, installs it into a fresh virtual
# environment outside the checkout, and there lists and loads every shipped optimizer with
# `lopt.pretrained` (its weights travel in the wheel as lopt/shipped/; .ci/run calls this).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --upgrade pip
"$WORK/venv/bin/python" -m pip wheel -q --no-deps "$ROOT" -w "$WORK/dist"
"$WORK/venv/bin/python" -m pip install -q "$WORK"/dist/*.whl
cd "$WORK"
"$WORK/venv/bin/python" - "$ROOT" <<'PY'
import sys
from pathlib import Path

import jax.numpy as jnp
import optax

import lopt
from lopt.hub import verified_folder

root = Path(sys.argv[1]).resolve()
where = Path(lopt.__file__).resolve()
assert root not in where.parents, f"lopt imported from the checkout ({where}), not the wheel"
names = lopt.pretrained()
assert names, "the wheel ships no optimizer"
params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
for name in names:
    tx = lopt.pretrained(name, num_steps=10)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    updates, _ = tx.update(params, tx.init(params), params, loss=jnp.float32(1.0))
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in updates.values()), name
    folder, _ = verified_folder(name)  # the weights' folder: an entry may share another's
    assert where.parent in folder.parents, f"{name}'s weights are not the wheel's: {folder}"
    print(f"[wheel] {name}: loads from {folder}, finite update")
print(f"[wheel] {len(names)} shipped optimizer(s) load from the installed wheel")
PY
