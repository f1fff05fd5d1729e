"""Checkpoints of meta-training: meta-parameters, the full training state and the config.

A checkpoint directory holds one orbax step folder per saved outer step, each with four items:

* ``theta``: the meta-parameters (a pytree of arrays);
* ``state``: everything else needed to resume (outer optimizer state, particle states, raw
  ``uint32`` PRNG key data, step counters, ...);
* ``config``: the run configuration as a JSON dict;
* ``manifest``: for every array leaf its path, shape, dtype and SHA-256 digest, so that a
  restore can name the leaf that does not fit and never returns silently corrupted values.

Next to the step folders, ``best.json`` (written by meta-training's validation, see
`meta_train.validation`) marks the step with the best meta-validation score and holds the
history of scores. The marked step is never rotated away, and `load_theta` (so
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
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "RESUME_MUTABLE_KEYS",
    "CheckpointError",
    "Checkpointer",
    "CorruptCheckpointError",
    "ConfigMismatchError",
    "NonFiniteThetaError",
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

_MANIFEST_VERSION = 1
BEST_FILE = "best.json"
_BEST_VERSION = 1
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_TREE_ITEMS = ("theta", "state")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the requested structure."""


class CorruptCheckpointError(CheckpointError):
    """A saved step cannot be read back or its values fail their checksum."""


class NonFiniteThetaError(CheckpointError):
    """Meta-parameters hold NaN or inf: they are never saved, and never loaded."""


class ConfigMismatchError(ValueError):
    """The current config differs from a checkpoint's in keys that cannot change on resume.

    Attributes:
      differences: ``(key, saved_value, current_value)`` for every offending key.
    """

    def __init__(self, message: str, differences: list[tuple[str, Any, Any]]):
        super().__init__(message)
        self.differences = differences


# ------------------------------------------------------------------------------------- helpers


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    # Registering every item lets us restore a subset (e.g. only the manifest) without orbax
    # warning about items it "could not restore".
    return {
        "theta": ocp.StandardCheckpointHandler(),
        "state": ocp.StandardCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
        "manifest": ocp.JsonCheckpointHandler(),
    }


def _manager(directory: str, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        # Rotation is done by `Checkpointer.save` only after a save succeeded: orbax deletes old
        # steps in its finalize step even when the new one failed to commit.
        max_to_keep=None,
        create=create,
        # Synchronous saves raise their errors in `save` and never leave a half-registered step.
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(directory, options=options, item_handlers=_item_handlers())


def _key_token(entry: Any) -> str:
    """One path entry as a plain string: NamedTuple fields and dict keys compare equal."""
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return str(entry.key)
    return str(entry)


def _leaves(tree: Any) -> list[tuple[tuple[str, ...], str, Any]]:
    """`(tokens, display_path, leaf)` for every leaf of `tree`."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(_key_token(k) for k in path), jax.tree_util.keystr(path), x) for path, x in flat]


def _digest(x: Any) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


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


def _fmt_leaf(entry: Mapping[str, Any]) -> str:
    return f"shape {tuple(entry['shape'])} {entry['dtype']}"


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


def _verify(entries: list[dict[str, Any]], tree: Any, item: str, where: str) -> None:
    """Raises `CheckpointError` unless every restored leaf has its saved shape, dtype and digest."""
    saved = {tuple(e["keys"]): e for e in entries}
    restored = _leaves(tree)
    if len(restored) != len(saved):
        raise CorruptCheckpointError(
            f"checkpoint {where} is corrupt: {item} restored {len(restored)} leaves, the manifest "
            f"lists {len(saved)}"
        )
    for tokens, display, x in restored:
        entry = saved.get(tokens)
        if entry is None:
            raise CorruptCheckpointError(
                f"checkpoint {where} is corrupt: {item}{display} is not in its manifest"
            )
        x = np.asarray(x)
        if list(x.shape) != entry["shape"] or str(x.dtype) != entry["dtype"]:
            raise CorruptCheckpointError(
                f"checkpoint {where} is corrupt: {item}{display} restored as shape {x.shape} "
                f"{x.dtype}, saved as {_fmt_leaf(entry)}"
            )
        if _digest(x) != entry["sha256"]:
            raise CorruptCheckpointError(
                f"checkpoint {where} is corrupt: the values of {item}{display} differ from the "
                "saved ones (checksum mismatch)"
            )


def _non_finite(tree: Any) -> list[str]:
    """Display paths of the floating-point leaves of `tree` that hold NaN or inf."""
    return [
        display
        for _, display, x in _leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact) and not bool(jnp.isfinite(x).all())
    ]


def _check_finite_theta(theta: Any, where: str) -> None:
    bad = _non_finite(theta)
    if bad:
        shown = ", ".join(f"theta{p}" for p in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise NonFiniteThetaError(
            f"checkpoint {where} holds meta-parameters that are not finite (NaN or inf in "
            f"{shown}); an optimizer with them is unusable"
        )


def _raise_with_earlier_steps(
    mgr: ocp.CheckpointManager, step: int, where: str, e: CheckpointError
):
    """Re-raises `e` with the steps before `step` as its last line: what the user can fall
    back on (unchanged when there are none). Call it from the `except` block."""
    earlier = sorted(s for s in mgr.all_steps() if s < step)
    if not earlier:
        raise e
    raise type(e)(
        f"{e}\nEarlier steps on disk: {earlier}; restore one with step=... (python -m "
        f"evaluate --step), or move {where} aside to resume from step {earlier[-1]}."
    ) from e


def _first_line(e: BaseException, limit: int = 200) -> str:
    # tensorstore errors embed a whole JSON spec; the first line's head is what matters.
    text = str(e).strip().splitlines()
    line = (text[0] if text else "").split(" See full TensorStore details")[0]
    return f"{type(e).__name__}: {line[:limit]}{'...' if len(line) > limit else ''}"


def _describe(directory: str) -> str:
    """What a directory holds, for error messages."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        return f"cannot list it ({e.strerror})"
    if not names:
        return "it is empty"
    parts = []
    for name in names[:20]:
        path = os.path.join(directory, name)
        if name.endswith(_TMP_SUFFIX):
            parts.append(f"{name} (interrupted save, ignored)")
        elif os.path.isdir(path) and any(n.isdigit() for n in _safe_listdir(path)):
            parts.append(f"{name}/ (holds step folders: is this the checkpoint directory?)")
        else:
            parts.append(name + ("/" if os.path.isdir(path) else ""))
    if len(names) > 20:
        parts.append(f"... {len(names) - 20} more")
    return "found: " + ", ".join(parts)


def _safe_listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _restore_items(
    mgr: ocp.CheckpointManager, step: int, where: str, **items: ocp.args.CheckpointArgs
) -> Any:
    try:
        return mgr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax/tensorstore raise many types; all mean "unreadable" here
        raise CorruptCheckpointError(
            f"cannot read {', '.join(items)} of checkpoint {where} ({_first_line(e)}); the step "
            "folder is incomplete or corrupt"
        ) from e


def _read_manifest(mgr: ocp.CheckpointManager, step: int, where: str) -> dict[str, Any]:
    manifest = _restore_items(mgr, step, where, manifest=ocp.args.JsonRestore()).manifest
    if (
        not isinstance(manifest, dict)
        or manifest.get("version") != _MANIFEST_VERSION
        or not all(isinstance(manifest.get(k), list) for k in _TREE_ITEMS)
    ):
        raise CorruptCheckpointError(f"checkpoint {where} has an invalid manifest")
    return manifest


def _pick_step(mgr: ocp.CheckpointManager, directory: str, step: int | None) -> int:
    steps = sorted(mgr.all_steps())
    if not steps:
        raise CheckpointError(f"no complete checkpoint in {directory}: {_describe(directory)}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {directory}; steps: {steps}")
    return step


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


Step = int | str | None
"""Which checkpoint to load: None (the best-marked step, else the latest), "best", "latest"
or a step number."""


def load_theta(directory: str, step: Step = None) -> tuple[Any, dict]:
    """Loads meta-parameters and config from a checkpoint directory alone.

    No abstract target is needed: theta comes back as nested dicts of arrays (what flax params
    are); NamedTuples in theta would come back as dicts.

    Args:
      directory: a checkpoint directory written by `Checkpointer`.
      step: which step (see `pick_step`): by default the step `best.json` marks (the best
        meta-validation score), or the latest when nothing is marked.

    Returns:
      `(theta, config)`.

    Raises:
      CheckpointError: the directory holds no complete checkpoint (the message lists what it
        found) or no such step.
      CorruptCheckpointError: the checkpoint is corrupt (any of its items).
      NonFiniteThetaError: its meta-parameters hold NaN or inf.
      The last two end with the earlier steps on disk, if any.
    """
    directory = _existing_directory(directory)
    mgr = _manager(directory, create=False)
    try:
        step = _resolve_step(mgr, directory, step)
        where = os.path.join(directory, str(step))
        try:
            manifest = _read_manifest(mgr, step, where)
            target = _local_theta_target(mgr, step, where)
            out = _restore_items(
                mgr,
                step,
                where,
                theta=ocp.args.StandardRestore(target),
                config=ocp.args.JsonRestore(),
            )
            _verify(manifest["theta"], out.theta, "theta", where)
            if not isinstance(out.config, dict):
                raise CorruptCheckpointError(f"checkpoint {where} has an invalid config")
            _check_finite_theta(out.theta, where)
        except (CorruptCheckpointError, NonFiniteThetaError) as e:
            _raise_with_earlier_steps(mgr, step, where, e)
        return out.theta, out.config
    finally:
        mgr.close()


def _existing_directory(directory: str) -> str:
    """The absolute path of a checkpoint directory that exists (else CheckpointError)."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.exists(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory} is a file, not a checkpoint directory")
    return directory


def _resolve_step(mgr: ocp.CheckpointManager, directory: str, step: Step) -> int:
    if step is None or step == "best":
        best = read_best(directory)
        if best is None:
            if step == "best":
                raise CheckpointError(
                    f"no best step is marked in {directory} (no {BEST_FILE}: the run had no "
                    "meta-validation); load step='latest' or a step number"
                )
            return _pick_step(mgr, directory, None)
        steps = sorted(mgr.all_steps())
        if best["step"] not in steps:
            raise CheckpointError(
                f"{BEST_FILE} in {directory} marks step {best['step']} as the best, but that "
                f"step is not on disk (steps: {steps}); load step='latest' or a step number"
            )
        return best["step"]
    if step == "latest":
        return _pick_step(mgr, directory, None)
    if isinstance(step, bool) or not isinstance(step, int | np.integer):
        raise CheckpointError(f"step must be None, 'best', 'latest' or a number, got {step!r}")
    return _pick_step(mgr, directory, int(step))


def pick_step(directory: str, step: Step = None) -> int:
    """The step `load_theta(directory, step)` loads.

    Args:
      directory: a checkpoint directory.
      step: None (the best-marked step, else the latest), 'best' (must be marked),
        'latest' or a step number.

    Raises:
      CheckpointError: no such step, nothing saved, or a marked step that is not on disk.
    """
    directory = _existing_directory(directory)
    mgr = _manager(directory, create=False)
    try:
        return _resolve_step(mgr, directory, step)
    finally:
        mgr.close()


def read_best(directory: str) -> dict | None:
    """The best-step marker of a checkpoint directory (`BEST_FILE`), or None without one.

    Returns:
      `{'step': int, 'score': float, 'metric': str, 'history': [...], ...}`.

    Raises:
      CorruptCheckpointError: the file exists but is not a valid marker.
    """
    path = os.path.join(os.fspath(directory), BEST_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"cannot read {path} ({_first_line(e)})") from e
    if (
        not isinstance(record, dict)
        or record.get("version") != _BEST_VERSION
        or not isinstance(record.get("step"), int)
        or not isinstance(record.get("history"), list)
    ):
        raise CorruptCheckpointError(f"{path} is not a best-step marker of this version")
    return record


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


def _local_theta_target(mgr: ocp.CheckpointManager, step: int, where: str) -> Any:
    """θ's saved shapes and dtypes, placed on this process's first device.

    Without a target orbax restores arrays onto the devices they were saved from, and a
    checkpoint written by a run sharded over two devices would not load in a one-device
    process (a user's training loop); θ is small and replicated, so one device holds it.
    """
    try:
        meta = mgr.item_metadata(step)["theta"]
        tree = getattr(meta, "tree", meta)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree
        )
    except Exception as e:  # missing or unreadable metadata: the step is unusable
        raise CorruptCheckpointError(
            f"cannot read the metadata of theta in checkpoint {where} ({_first_line(e)})"
        ) from e


def saved_steps(directory: str) -> list[int]:
    """The complete steps in a checkpoint directory, ascending; [] if it does not exist.

    Creates nothing (unlike `Checkpointer`), so it can check a run folder before a run starts.
    """
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        return []
    mgr = _manager(directory, create=False)
    try:
        return sorted(mgr.all_steps())
    finally:
        mgr.close()


def describe_directory(directory: str) -> str:
    """What a directory holds, for error messages (interrupted saves are marked)."""
    return _describe(os.path.abspath(os.fspath(directory)))


def _flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_config(value, name + "."))
        else:
            flat[name] = value
    return flat


def _normalise(value: Any) -> Any:
    # JSON turns tuples into lists; a restored config must equal the tuple-valued original.
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _normalise(v) for k, v in value.items()}
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
        compare alike); the message lists each as ``section.key: saved X, now Y``.
    """
    old, new = _flatten_config(saved), _flatten_config(current)
    differences = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        same = a is not _MISSING and b is not _MISSING and _normalise(a) == _normalise(b)
        if not same and not _is_mutable(key):
            differences.append((key, a, b))
    if differences:
        lines = [f"{k}: saved {_show(a)}, now {_show(b)}" for k, a, b in differences]
        raise ConfigMismatchError(
            "the config differs from the checkpoint's in keys that cannot change on resume "
            f"(only {', '.join(sorted(RESUME_MUTABLE_KEYS))} may):\n  " + "\n  ".join(lines),
            [(k, _unwrap(a), _unwrap(b)) for k, a, b in differences],
        )
