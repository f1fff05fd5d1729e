"""Where the project's caches live: one root for the prepared datasets (`datasets/`), the
benchmark's baselines (`bench/`) and XLA's compiled programs (`jax/`)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LOPT_CACHE_DIR"
"""The environment variable that moves every cache (default `~/.cache/lopt`)."""


def cache_dir(name: str) -> Path:
    """One cache's folder: `$LOPT_CACHE_DIR/name`, else `~/.cache/lopt/name` (not created).

    Args:
      name: the cache, e.g. 'datasets', 'bench' or 'jax'.

    Returns:
      The folder's path, `~` expanded.
    """
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "lopt") / name
