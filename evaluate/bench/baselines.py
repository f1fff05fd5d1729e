"""Hand-designed baselines of the benchmark, tuned per task, and their on-disk cache.

Each baseline is an optax optimizer whose only tuned number is the learning rate, searched
over a grid of {1, 3} x 10^k and picked on mean final validation loss over seeds (a seed
that diverges makes that rate score +inf). The whole grid x seeds trains in one jitted,
vmapped call: the learning rate is traced (`optax.scale(-lr)` after the optimizer's
direction), so a grid costs one compilation.

- `adam`: Adam (Kingma & Ba 2015), constant learning rate. The reference of every speed-up.
- `adam_cosine`: Adam with linear warm-up over 5 % of the steps, then cosine decay to 0
  (Loshchilov & Hutter 2017).
- `sgdm`: SGD with heavy-ball momentum 0.9 (Polyak 1964), constant learning rate.

Tuning a baseline costs far more than training a candidate, so results are cached under
`cache_dir`, keyed by everything that determines them (`cache_key`): a second candidate on
the same suite trains only itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import jax
import optax

from tasks.caches import cache_dir

# Bump when anything that changes the baselines' numbers changes (training loop, metrics,
# seeds): every cached entry then misses.
BASELINE_VERSION = 1
MOMENTUM = 0.9
WARMUP_FRACTION = 0.05
_PACKAGES = ("jax", "jaxlib", "optax", "flax", "numpy")


def lr_grid(lo: float, hi: float) -> tuple[float, ...]:
    """Learning rates {1, 3} x 10^k from `lo` to `hi` inclusive (both on the grid)."""
    out = []
    for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in (1, 3):
            v = float(f"{m}e{k}")
            if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9):
                out.append(v)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A baseline optimizer and its learning-rate grid.

    Attributes:
      name: 'adam', 'adam_cosine' or 'sgdm'.
      lrs: the grid.
    """

    name: str
    lrs: tuple[float, ...]

    @property
    def label(self) -> str:
        return LABELS[self.name]

    def direction(self, num_steps: int) -> optax.GradientTransformation:
        """The optimizer with a unit learning rate (the grid's rate scales it)."""
        if self.name == "adam":
            return optax.scale_by_adam()
        if self.name == "adam_cosine":
            warmup = max(1, round(WARMUP_FRACTION * num_steps))
            schedule = optax.warmup_cosine_decay_schedule(
                0.0, 1.0, warmup, max(num_steps, warmup + 1), 0.0
            )
            return optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(schedule))
        if self.name == "sgdm":
            return optax.trace(decay=MOMENTUM)
        raise ValueError(f"unknown baseline {self.name!r}; known: {sorted(LABELS)}")

    def transform(self, lr: Any, num_steps: int) -> optax.GradientTransformation:
        """The optimizer at learning rate `lr` (may be traced)."""
        return optax.chain(self.direction(num_steps), optax.scale(-lr))


LABELS = {
    "adam": "Adam (tuned)",
    "adam_cosine": "Adam, warm-up + cosine (tuned)",
    "sgdm": "SGD, momentum 0.9 (tuned)",
}
DEFAULT_BASELINES = (
    Baseline("adam", lr_grid(1e-4, 1e-1)),
    Baseline("adam_cosine", lr_grid(1e-4, 1e-1)),
    Baseline("sgdm", lr_grid(1e-3, 1.0)),
)
# Four rates each: enough to tune the quick suite's small problems in about a minute.
QUICK_BASELINES = (
    Baseline("adam", lr_grid(3e-3, 1e-1)),
    Baseline("adam_cosine", lr_grid(3e-3, 1e-1)),
    Baseline("sgdm", lr_grid(3e-2, 1.0)),
)


def versions() -> dict[str, str]:
    """Versions of the packages that determine the numbers (part of the cache key)."""
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def cache_key(
    task: dict[str, Any],
    baseline: Baseline,
    seeds: int,
    eval_points: int,
    train_bins: int,
    data_fingerprint: str,
) -> str:
    """A hash of everything a baseline's tuned result depends on.

    Args:
      task: the task's JSON description (`BenchTask.to_json()`: model, data, horizon).
      baseline: the baseline and its grid.
      seeds: seeds per rate (the keys derive from the task's name and the seed index).
      eval_points: the curves' resolution: about how many validation evaluations per run.
      train_bins: the curves' resolution: bins of the training-loss curve.
      data_fingerprint: a hash of the task's data (files can change under the same name).

    Returns:
      A hex digest.
    """
    blob = json.dumps(
        {
            "version": BASELINE_VERSION,
            "task": {k: v for k, v in task.items() if k != "description"},
            "baseline": baseline.name,
            "lrs": list(baseline.lrs),
            "seeds": seeds,
            "eval_points": eval_points,
            "train_bins": train_bins,
            "data": data_fingerprint,
            "packages": versions(),
            "backend": jax.default_backend(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    """`LOPT_CACHE_DIR/bench`, else `~/.cache/lopt/bench`."""
    return cache_dir("bench")


def file_name(name: str) -> str:
    """A task's or row's name made safe as a file name: `mlp-fashion_mnist@1000` ->
    `mlp-fashion_mnist_1000` (runs of other characters than letters, digits, '.', '-', '_'
    become one '_'; no extension)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "task"


def cache_path(cache_dir: str | Path, task_name: str, baseline: str, key: str) -> Path:
    return Path(cache_dir) / file_name(task_name) / f"{baseline}-{key}.json"


def read_cache(path: Path, key: str) -> dict[str, Any] | None:
    """The cached entry at `path` if it is whole and has `key`; None otherwise (a corrupt
    or foreign file is a miss, never an error: the baseline is simply recomputed)."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    return entry


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes JSON to `path` through a temporary file and a rename (no torn files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
