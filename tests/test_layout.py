"""The layout shows the architecture: `lopt` stands alone, the benchmark and the project's
measurement tools are packages of their own, and every command line can be dispatched."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The packages `lopt` must never import: it is what users install to load an optimizer.
OUTSIDE_LOPT = ("meta_train", "evaluate", "tasks")


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """`(line, module)` of every import in a file, lazy ones inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # A relative import stays inside lopt; only absolute ones can leave it.
            if node.level == 0 and node.module:
                found.append((node.lineno, node.module))
    return found


def test_no_file_of_lopt_imports_meta_train_evaluate_or_tasks():
    files = sorted((ROOT / "lopt").rglob("*.py"))
    assert files
    bad = [
        f"{path.relative_to(ROOT)}:{line}: import {module}"
        for path in files
        for line, module in _imported_modules(path)
        if module.split(".")[0] in OUTSIDE_LOPT
    ]
    assert not bad, "lopt must stand alone:\n" + "\n".join(bad)


def test_loading_a_shipped_optimizer_imports_nothing_outside_lopt():
    out = _run(
        "import json, sys\n"
        "import lopt, lopt.export, lopt.checkpoint\n"
        "lopt.export.load_optax('checkpoints/mnist1d-mlp-pes', num_steps=400)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {OUTSIDE_LOPT})))"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_meta_train_checkpoint_re_exports_the_read_side_without_copies():
    lopt_ckpt = importlib.import_module("lopt.checkpoint")
    mt_ckpt = importlib.import_module("meta_train.checkpoint")
    for name in lopt_ckpt.__all__:
        assert getattr(mt_ckpt, name) is getattr(lopt_ckpt, name), name
        assert name in mt_ckpt.__all__, name
    # Errors raised while reading are the ones meta-training's entry points catch.
    assert issubclass(mt_ckpt.CorruptCheckpointError, mt_ckpt.CheckpointError)


def test_the_bench_and_measure_packages_import_nothing_heavy():
    out = _run(
        "import json, sys\n"
        "import evaluate.bench, evaluate.measure\n"
        "print(json.dumps([m for m in ('jax', 'optax', 'orbax', 'meta_train') "
        "if m in sys.modules]))"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_python_m_evaluate_bench_still_runs():
    out = subprocess.run(
        [sys.executable, "-m", "evaluate.bench", "--help"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("usage: python -m evaluate.bench ")


@pytest.mark.slow  # ~2 minutes: a fresh interpreter per module
def test_every_module_imports_first_in_a_fresh_interpreter():
    """Import order never matters: each module of the project, imported before anything else
    (as a user's script or a worker may), imports without a circular-import error."""
    modules = sorted(
        ".".join(f.relative_to(ROOT).with_suffix("").parts)
        for package in ("lopt", "meta_train", "tasks", "evaluate")
        for f in (ROOT / package).rglob("*.py")
        if f.name != "__main__.py"
    )
    modules = [m.removesuffix(".__init__") for m in modules]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda m: (m, _run(f"import {m}")), modules))
    failed = {m: r.stderr.strip().splitlines()[-1] for m, r in results if r.returncode != 0}
    assert not failed, failed
