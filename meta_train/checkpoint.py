"""Checkpoints of meta-training: saving meta-parameters, the full training state and the config.

The write side of the checkpoint format, and the restore of the full state to resume a run.
Reading meta-parameters alone (`load_theta`, `pick_step`, `read_best`, ...) lives in
`lopt.checkpoint`, so that loading a trained optimizer needs nothing of meta-training; those
names are re-exported here. A checkpoint directory holds one orbax step folder per saved
outer step, each with four items:

* ``theta``: the meta-parameters (a pytree of arrays);
* ``state``: everything else needed to resume (outer optimizer state, particle states, raw
  ``uint32`` PRNG key data, step counters, ...);
* ``config``: the run configuration as a JSON dict;
* ``manifest``: for every array leaf its path, shape, dtype and SHA-256 digest, so that a
  restore can name the leaf that does not fit and never returns silently corrupted values.

Next to the step folders, ``best.json`` (written by meta-training's validation with
`write_best`, see `meta_train.validation`) marks the step with the best meta-validation score
and holds the history of scores. The marked step is never rotated away, and `load_theta` (so
`lopt.export.load_optax` and the evaluation) loads it by default; ``step="latest"`` or a
step number loads another.

Saves are synchronous and atomic (orbax writes ``N.orbax-checkpoint-tmp/`` and renames it), so a
run killed mid-save leaves the earlier steps intact and the half-written folder is ignored (a
save that fails with an error removes it). Meta-parameters that are not finite are never saved,
and a checkpoint holding them (written by an older version) is refused on restore:

    ckpt = Checkpointer("runs/x/checkpoints", max_to_keep=3)
    ckpt.save(step, theta, state, config.to_dict())
    theta, state, saved_config = ckpt.restore(jax.eval_shape(lambda: theta),
                                              jax.eval_shape(lambda: state))
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

# The read side is shared with `lopt` (which must not import meta_train); the public names
# are re-exported so that `from meta_train.checkpoint import load_theta` keeps working.
from lopt.checkpoint import (
    _BEST_VERSION,
    _MANIFEST_VERSION,
    _TMP_SUFFIX,
    BEST_FILE,
    CheckpointError,
    CorruptCheckpointError,
    NonFiniteThetaError,
    Step,
    _check_finite_theta,
    _digest,
    _first_line,
    _fmt_leaf,
    _leaves,
    _manager,
    _non_finite,
    _pick_step,
    _raise_with_earlier_steps,
    _read_manifest,
    _restore_items,
    _verify,
    describe_directory,
    load_theta,
    pick_step,
    read_best,
    saved_steps,
)

__all__ = [
    "BEST_FILE",
    "RESUME_MUTABLE_KEYS",
    "CheckpointError",
    "Checkpointer",
    "CorruptCheckpointError",
    "ConfigMismatchError",
    "NonFiniteThetaError",
    "Step",
    "as_saved",
    "check_compatible",
    "describe_directory",
    "load_theta",
    "pick_step",
    "read_best",
    "saved_steps",
    "write_best",
]

RESUME_MUTABLE_KEYS: frozenset[str] = frozenset(
    {
        "meta.outer_steps",
        "meta.stop_after",  # an equal-budget cut of a recipe goes on as the whole recipe
        "meta.init_from",  # only where θ started: a resumed run goes on from its own θ
        "run.out_dir",  # where a run lives is not part of its identity: moved folders resume
        "run.checkpoint_every",
        "run.log_every",
        "run.wandb_mode",
        "run.wandb_project",
        "run.max_to_keep",
        "eval.*",
        "valid.every",  # which steps validate; the tasks, seeds and score stay the same
        "valid.guard_*",
        # Where estimates are computed (backend, workers, staleness): a learner may come back
        # with more or fewer workers; runs from before the server had no [server] section.
        "server.*",
    }
)
"""Config keys (``section.key``; ``section.*`` for a whole section) that may change on resume."""


class ConfigMismatchError(ValueError):
    """The current config differs from a checkpoint's in keys that cannot change on resume.

    Attributes:
      differences: ``(key, saved_value, current_value)`` for every offending key.
    """

    def __init__(self, message: str, differences: list[tuple[str, Any, Any]]):
        super().__init__(message)
        self.differences = differences


# ------------------------------------------------------------------------------------- helpers


def _is_prng_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _to_arrays(tree: Any, item: str) -> Any:
    """Converts every leaf to a jax array so leaves restore with the dtypes `eval_shape` gives."""

    def convert(path, x):
        where = f"{item}{jax.tree_util.keystr(path)}"
        if _is_prng_key(x):
            raise TypeError(
                f"{where} is a typed PRNG key array; save jax.random.key_data(key) instead and "
                "rebuild it with jax.random.wrap_key_data after restoring"
            )
        try:
            return jnp.asarray(x)
        except TypeError as e:
            raise TypeError(f"{where}: cannot be saved as an array ({type(x).__name__})") from e

    return jax.tree_util.tree_map_with_path(convert, tree)


def _manifest_entries(tree: Any) -> list[dict[str, Any]]:
    return [
        {
            "path": display,
            "keys": list(tokens),
            "shape": list(x.shape),
            "dtype": str(x.dtype),
            "sha256": _digest(x),
        }
        for tokens, display, x in _leaves(tree)
    ]


def _as_abstract(tree: Any) -> Any:
    """Abstract target: `ShapeDtypeStruct`s stay, arrays and scalars become their structs."""

    def convert(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if _is_prng_key(x):
            raise TypeError("typed PRNG keys are not stored; use jax.random.key_data shapes")
        dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
        return jax.ShapeDtypeStruct(np.shape(x), jax.dtypes.canonicalize_dtype(dtype))

    return jax.tree.map(convert, tree)


def _check_target(entries: list[dict[str, Any]], target: Any, item: str, where: str) -> None:
    """Raises `CheckpointError` listing every leaf where `target` does not fit the manifest."""
    saved = {tuple(e["keys"]): e for e in entries}
    wanted = {
        tokens: (display, {"shape": list(x.shape), "dtype": str(x.dtype)})
        for tokens, display, x in _leaves(target)
    }
    problems = []
    for tokens, (display, want) in wanted.items():
        have = saved.get(tokens)
        if have is None:
            problems.append(f"{item}{display}: expected by the target but not in the checkpoint")
        elif have["shape"] != want["shape"] or have["dtype"] != want["dtype"]:
            problems.append(
                f"{item}{display}: checkpoint has {_fmt_leaf(have)}, target expects "
                f"{_fmt_leaf(want)}"
            )
    for tokens, have in saved.items():
        if tokens not in wanted:
            problems.append(f"{item}{have['path']}: in the checkpoint but not in the target")
    if problems:
        shown = problems[:10]
        if len(problems) > 10:
            shown.append(f"... and {len(problems) - 10} more")
        raise CheckpointError(
            f"checkpoint {where} does not match the requested {item} structure:\n  "
            + "\n  ".join(shown)
        )


# --------------------------------------------------------------------------------- public API


class Checkpointer:
    """Saves and restores meta-training checkpoints in one directory.

    Args:
      directory: checkpoint directory (created if missing).
      max_to_keep: the newest this many steps are kept; older ones are deleted after a save
        succeeds (None keeps all).
    """

    def __init__(self, directory: str, max_to_keep: int | None = 3):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.max_to_keep = max_to_keep
        self._mgr = _manager(self.directory, create=True)
        self._closed = False

    def _where(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, theta: Any, state: Any, config: dict) -> None:
        """Writes checkpoint `step`; returns once it is complete on disk.

        Args:
          step: outer step; must be larger than every step already saved (nothing is
            overwritten).
          theta: meta-parameters (pytree of arrays).
          state: the rest of the training state (pytree of arrays and scalars; PRNG keys as
            raw ``uint32`` key data).
          config: the run configuration, JSON-serialisable.

        Raises:
          CheckpointError: the step exists or precedes the latest one, or writing failed (the
            earlier steps are untouched).
          NonFiniteThetaError: theta holds NaN or inf (nothing is written).
          TypeError: a leaf cannot be stored or the config is not JSON-serialisable.
          ValueError: a bad step, or theta or state holds no arrays.
        """
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        step = int(step)
        # Validate everything before touching the disk.
        try:
            config = json.loads(json.dumps(config))
        except (TypeError, ValueError) as e:
            raise TypeError(f"config is not JSON-serialisable: {e}") from e
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        theta = _to_arrays(theta, "theta")
        state = _to_arrays(state, "state")
        for item, tree in (("theta", theta), ("state", state)):
            if not jax.tree.leaves(tree):  # orbax cannot save an item without arrays
                raise ValueError(f"{item} holds no arrays; there is nothing to checkpoint")
        bad = _non_finite(theta)
        if bad:
            raise NonFiniteThetaError(
                f"refusing to save step {step} in {self.directory}: the meta-parameters are not "
                f"finite (NaN or inf in {', '.join(f'theta{p}' for p in bad[:5])}); earlier "
                "checkpoints are untouched"
            )
        manifest = {
            "version": _MANIFEST_VERSION,
            "step": step,
            "theta": _manifest_entries(theta),
            "state": _manifest_entries(state),
        }

        self._mgr.reload()
        latest = self._mgr.latest_step()
        if latest is not None and step <= latest:
            raise CheckpointError(
                f"refusing to save step {step} in {self.directory}: step {latest} is already "
                "saved and checkpoints are never overwritten"
            )
        try:
            saved = self._mgr.save(
                step,
                args=ocp.args.Composite(
                    theta=ocp.args.StandardSave(theta),
                    state=ocp.args.StandardSave(state),
                    config=ocp.args.JsonSave(config),
                    manifest=ocp.args.JsonSave(manifest),
                ),
            )
            self._mgr.wait_until_finished()
        except Exception as e:
            # This save's half-written folder would only be replaced by the next save of the
            # same step; remove it now. Re-read the disk so the manager lists committed steps.
            shutil.rmtree(self._where(step) + _TMP_SUFFIX, ignore_errors=True)
            self._mgr.reload()
            raise CheckpointError(
                f"saving step {step} to {self.directory} failed ({_first_line(e)}); earlier "
                "checkpoints are untouched"
            ) from e
        if not saved or not os.path.isdir(self._where(step)):
            self._mgr.reload()
            raise CheckpointError(f"orbax did not write step {step} in {self.directory}")

        self.rotate()

    def rotate(self) -> None:
        """Deletes all but the newest `max_to_keep` steps, except the step `best.json` marks
        (never rotated away). `save` calls it; call it after moving the mark."""
        if self.max_to_keep is None:
            return
        best = read_best(self.directory)
        keep = best["step"] if best else None
        for old in sorted(self._mgr.all_steps())[: -self.max_to_keep]:
            if old != keep:
                self._mgr.delete(old)

    def all_steps(self) -> list[int]:
        """Returns the saved steps on disk, ascending."""
        self._mgr.reload()  # another process (the trainer) may have written since
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        """Returns the newest saved step on disk, or None if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(
        self, abstract_theta: Any, abstract_state: Any, step: int | None = None
    ) -> tuple[Any, Any, dict]:
        """Restores a checkpoint into the structure of the abstract trees.

        Args:
          abstract_theta: tree of `jax.ShapeDtypeStruct` (e.g. from `jax.eval_shape`) or arrays
            with the structure, shapes and dtypes of theta; NamedTuples come back as such.
          abstract_state: the same for the state.
          step: which step; defaults to the latest.

        Returns:
          `(theta, state, config)`.

        Raises:
          CheckpointError: no such (complete) step, the trees do not match the saved ones
            (the message names each leaf), or the files are corrupt.
        """
        self._mgr.reload()
        step = _pick_step(self._mgr, self.directory, step)
        where = self._where(step)
        abstract_theta = _as_abstract(abstract_theta)
        abstract_state = _as_abstract(abstract_state)
        try:
            manifest = _read_manifest(self._mgr, step, where)
            _check_target(manifest["theta"], abstract_theta, "theta", where)
            _check_target(manifest["state"], abstract_state, "state", where)
            out = _restore_items(
                self._mgr,
                step,
                where,
                theta=ocp.args.StandardRestore(abstract_theta),
                state=ocp.args.StandardRestore(abstract_state),
                config=ocp.args.JsonRestore(),
            )
            _verify(manifest["theta"], out.theta, "theta", where)
            _verify(manifest["state"], out.state, "state", where)
            _check_finite_theta(out.theta, where)
        except (CorruptCheckpointError, NonFiniteThetaError) as e:
            # No silent fallback: resuming from an older step must be the user's choice.
            _raise_with_earlier_steps(self._mgr, step, where, e)
        return out.theta, out.state, out.config

    def read_config(self, step: int | None = None) -> dict:
        """Reads only the config saved with a step (default: the latest).

        Raises:
          CheckpointError: no such step; CorruptCheckpointError (with the earlier steps on
            disk as the last line) when the config cannot be read.
        """
        self._mgr.reload()
        step = _pick_step(self._mgr, self.directory, step)
        where = self._where(step)
        try:
            config = _restore_items(self._mgr, step, where, config=ocp.args.JsonRestore()).config
            if not isinstance(config, dict):
                raise CorruptCheckpointError(f"checkpoint {where} has an invalid config")
        except CorruptCheckpointError as e:
            _raise_with_earlier_steps(self._mgr, step, where, e)
        return config

    def close(self) -> None:
        """Releases orbax's resources; the checkpointer cannot be used afterwards."""
        if not self._closed:
            self._closed = True
            self._mgr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def write_best(directory: str, record: dict) -> None:
    """Writes the best-step marker atomically (write, then rename).

    Args:
      directory: the checkpoint directory; `record['step']` must be saved there already.
      record: `{'step': int, 'score': float, 'history': [...], ...}` (JSON-serialisable).
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, BEST_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"version": _BEST_VERSION, **record}, f, indent=1)
    os.replace(tmp, path)


def _flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_config(value, name + "."))
        else:
            flat[name] = value
    return flat


def as_saved(value: Any) -> Any:
    """A config value as it reads back from a saved config: JSON turns tuples into lists, so
    a restored config equals the tuple-valued original only once both are normalised.

    Args:
      value: a config value (nested lists, tuples and mappings allowed).

    Returns:
      The value with every tuple a list.
    """
    if isinstance(value, list | tuple):
        return [as_saved(v) for v in value]
    if isinstance(value, Mapping):
        return {k: as_saved(v) for k, v in value.items()}
    return value


def _is_mutable(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUME_MUTABLE_KEYS)


_MISSING = object()


def _show(value: Any) -> str:
    if value is _MISSING:
        return "<missing>"
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _unwrap(value: Any) -> Any:
    return None if value is _MISSING else value


def check_compatible(saved: dict, current: dict) -> None:
    """Checks that a run may resume from a checkpoint written with config `saved`.

    Args:
      saved: the checkpoint's config, ``{section: {key: value}}``.
      current: the config of the resuming run.

    Raises:
      ConfigMismatchError: a key outside `RESUME_MUTABLE_KEYS` differs (lists and tuples
        compare alike; a key the checkpoint lacks, added since, compares as its default);
        the message lists each as ``section.key: saved X, now Y``.
    """
    from meta_train.config import from_dict  # noqa: PLC0415 - config imports this module

    old, new = _flatten_config(saved), _flatten_config(current)
    # A key added since the checkpoint was written, at its default, keeps the old behaviour
    # ([lopt] is left out: its defaults are its kind's).
    defaults = {
        k: v for k, v in _flatten_config(from_dict({}).to_dict()).items() if k[:5] != "lopt."
    }
    differences = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a is _MISSING and key in defaults and b is not _MISSING:
            a = defaults[key]
        same = a is not _MISSING and b is not _MISSING and as_saved(a) == as_saved(b)
        if not same and not _is_mutable(key):
            differences.append((key, a, b))
    if differences:
        lines = [f"{k}: saved {_show(a)}, now {_show(b)}" for k, a, b in differences]
        raise ConfigMismatchError(
            "the config differs from the checkpoint's in keys that cannot change on resume "
            f"(only {', '.join(sorted(RESUME_MUTABLE_KEYS))} may):\n  " + "\n  ".join(lines),
            [(k, _unwrap(a), _unwrap(b)) for k, a, b in differences],
        )
