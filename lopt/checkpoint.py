"""Reading meta-training checkpoints: meta-parameters, the best-step marker, saved steps.

The read side of the checkpoint format that `meta_train.checkpoint.Checkpointer` writes, kept
in `lopt` so that loading a trained optimizer (`lopt.export.load_optax`) needs nothing of
meta-training. A checkpoint directory holds one orbax step folder per saved outer step, each
with four items:

* ``theta``: the meta-parameters (a pytree of arrays);
* ``state``: everything else needed to resume meta-training (read by `Checkpointer.restore`);
* ``config``: the run configuration as a JSON dict;
* ``manifest``: for every array leaf its path, shape, dtype and SHA-256 digest, so that a
  restore can name the leaf that does not fit and never returns silently corrupted values.

Next to the step folders, ``best.json`` (`BEST_FILE`, written by meta-training's validation)
marks the step with the best meta-validation score. `load_theta` loads that step by default;
``step="latest"`` or a step number loads another:

    theta, config = load_theta("checkpoints/mnist1d-mlp-pes")
    theta, config = load_theta("runs/x/checkpoints", step="latest")

Half-written step folders (``N.orbax-checkpoint-tmp``, from a run killed mid-save) are
ignored; a step whose values fail their checksum, or whose meta-parameters are not finite,
is refused with an error naming the earlier steps on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "BEST_FILE",
    "CheckpointError",
    "CorruptCheckpointError",
    "NonFiniteThetaError",
    "Step",
    "describe_directory",
    "load_theta",
    "pick_step",
    "read_best",
    "saved_steps",
]

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
        # Rotation is done by `meta_train.checkpoint.Checkpointer.save` only after a save
        # succeeded: orbax deletes old steps in its finalize step even when the new one failed.
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


def _fmt_leaf(entry: Mapping[str, Any]) -> str:
    return f"shape {tuple(entry['shape'])} {entry['dtype']}"


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
      CorruptCheckpointError: the checkpoint is corrupt (any of its items); the message
        ends with the earlier steps on disk, if any.
      NonFiniteThetaError: its meta-parameters hold NaN or inf; the message ends with the
        earlier steps on disk, if any.
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
