"""Export of a learned optimizer as an `optax.GradientTransformationExtraArgs`.

A thin adapter over `LearnedOptimizer.optimizer(theta)`: the same `init` and `update`
functions, never a second implementation. The loss arrives as the keyword `loss=`:

    tx = optax.chain(optax.clip_by_global_norm(1.0), as_optax(lopt, theta, num_steps=1000))
    updates, state = tx.update(grads, state, params, loss=loss)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lopt.base import LearnedOptimizer, MetaParams


def as_optax(
    lopt: LearnedOptimizer, theta: MetaParams, num_steps: int
) -> optax.GradientTransformationExtraArgs:
    """Returns the learned optimizer with meta-parameters `theta` as an optax transformation.

    Args:
      lopt: the learned optimizer.
      theta: its meta-parameters.
      num_steps: the training horizon the optimizer's progress features refer to; use the
        number of steps you will train for (learned optimizers generalise best near the
        horizons they were meta-trained on).

    Returns:
      A `GradientTransformationExtraArgs` whose `update(updates, state, params, *, loss)`
      requires `params` and the scalar training `loss` of the current step. Learned
      optimizers compute in float32 for any parameter dtype, give non-finite gradient
      entries a zero update without letting them into their state, anneal (1/t) instead of
      extrapolating when trained past `num_steps`, and pass non-float leaves through with
      zero updates (see `lopt.mlp_lopt`).
    """
    opt = lopt.optimizer(theta)

    def init_fn(params):
        return opt.init(params, num_steps)

    def update_fn(updates, state, params=None, *, loss: Any = None, **extra_args):
        del extra_args  # other transformations' extra arguments pass through optax.chain
        if params is None:
            raise ValueError("the learned optimizer needs `params` in update(...)")
        if loss is None:
            raise ValueError(
                "the learned optimizer needs the training loss: update(..., loss=loss)"
            )
        return opt.update(updates, state, params, loss)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


NORMALISATIONS = ("rms", "none")
"""How `scale_by_learned` sets the size of its output (see there)."""


class ScaleByLearnedState(NamedTuple):
    """State of `scale_by_learned`: the learned optimizer's own state."""

    inner: Any


def scale_by_learned(
    lopt: LearnedOptimizer,
    theta: MetaParams,
    num_steps: int,
    normalise: str = "rms",
    eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    """The learned rule's direction as an optax `scale_by_...` transformation, its size left
    to an ordinary learning rate or schedule.

    Like `optax.scale_by_adam`, the output points along the gradient and is meant to be
    followed by `optax.scale_by_learning_rate` (which negates and scales it), with any other
    optax pieces in between:

        tx = optax.chain(
            scale_by_learned(lopt, theta, num_steps=5000),
            optax.add_decayed_weights(1e-4),
            optax.scale_by_learning_rate(optax.cosine_decay_schedule(3e-3, 5000)),
        )

    The rule's own fixed step schedule is switched off (the learning rate's schedule
    replaces it); its network still reads the training progress of `num_steps`.

    After Celo2 (Moudgil, Knyazev, Belilovsky, ICLR 2026), whose learned MLP rule is
    normalised by its RMS over each tensor at every step so that a learning-rate schedule
    sets the step size.

    Args:
      lopt: the learned optimizer.
      theta: its meta-parameters.
      num_steps: the training horizon its progress features refer to (>= 1).
      normalise: 'rms': each tensor's update divided by its root mean square, so a learning
        rate of lr moves every tensor by lr in RMS (and cancels per-tensor factors such as
        fan-in scaling); 'none': the rule's update divided by its `step_mult`, so
        `optax.scale_by_learning_rate(lopt.step_mult)` reproduces `as_optax` with a constant
        step schedule.
      eps: added to each tensor's RMS ('rms'): a tensor whose update is zero stays zero.

    Returns:
      A `GradientTransformationExtraArgs` whose `update(updates, state, params, *, loss)`
      needs `params` and the training `loss`, as `as_optax`'s.
    """
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
    if hasattr(lopt, "step_schedule"):
        lopt = dataclasses.replace(lopt, step_schedule="constant")
    inner = as_optax(lopt, theta, num_steps)
    unit = float(getattr(lopt, "step_mult", 1.0))

    def init_fn(params):
        return ScaleByLearnedState(inner.init(params))

    def direction(u):
        if not jnp.issubdtype(u.dtype, jnp.floating):
            return u
        x = u.astype(jnp.float32)
        if normalise == "rms":
            x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x)) + eps)
        else:
            x = x / unit
        return (-x).astype(u.dtype)

    def update_fn(updates, state, params=None, *, loss: Any = None, **extra_args):
        out, new = inner.update(updates, state.inner, params, loss=loss, **extra_args)
        return jax.tree.map(direction, out), ScaleByLearnedState(new)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def load_rule(checkpoint_dir: str, step: int | str | None = None) -> tuple[Any, Any, dict]:
    """The learned optimizer and meta-parameters saved in a checkpoint directory, without
    an optax wrapper (`load_optax` adds it).

    Args:
      checkpoint_dir: the run's checkpoint directory (holds orbax steps and the config).
      step: which saved outer step, as in `load_optax`.

    Returns:
      `(lopt, theta, config)`: the optimizer as the run's config builds it, its
      meta-parameters as arrays, and the run's config.
    """
    from lopt.checkpoint import load_theta  # noqa: PLC0415 - orbax is heavy
    from lopt.registry import make_lopt  # noqa: PLC0415

    theta, config = load_theta(checkpoint_dir, step=step)
    lopt_cfg = dict(config["lopt"])
    lopt = make_lopt(lopt_cfg.pop("kind"), **lopt_cfg)
    return lopt, jax.tree.map(jax.numpy.asarray, theta), config


def load_optax(checkpoint_dir: str, num_steps: int | None = None, step: int | str | None = None):
    """Loads an exported learned optimizer from a meta-training checkpoint directory alone.

    Args:
      checkpoint_dir: the run's checkpoint directory (holds orbax steps and the config).
      num_steps: training horizon; defaults to the maximum episode length of meta-training.
      step: which saved outer step: by default the one with the best meta-validation score
        (marked in the directory's `best.json`), else the latest; 'latest', 'best' or a
        number choose (see `lopt.checkpoint.pick_step`).

    Returns:
      `(tx, theta, lopt)`: the optax transformation, its meta-parameters and the optimizer.
    """
    lopt, theta, config = load_rule(checkpoint_dir, step)
    if num_steps is None:
        num_steps = int(config["meta"]["max_episode_len"])
    return as_optax(lopt, theta, num_steps), theta, lopt


ARTIFACT_TYPE = "learned-optimizer"
"""The type of the wandb Artifact in which meta-training logs its best meta-parameters."""


def load_optax_artifact(
    ref: str,
    num_steps: int | None = None,
    *,
    run_dir: str | None = None,
    project: str | None = None,
):
    """Loads a learned optimizer from a wandb Artifact of type `ARTIFACT_TYPE` by name.

    Meta-training (`meta_train.main`) logs its best checkpoint step as the artifact
    ``lopt-<run name>``: the orbax step folder, best.json and config.json, the checkpoint
    directory `load_optax` reads.

    Online (``run_dir=None``) the artifact is downloaded with ``wandb.Api().artifact(ref)``
    (needs ``wandb login``). An offline run has no server to ask, so a name alone cannot be
    found; with `run_dir` the offline runs' transaction logs (``run-*.wandb``) under it are
    read instead: each logged version's record holds its manifest, whose files wandb copied
    into ``WANDB_DATA_DIR/artifacts/staging`` (out_dir/wandb/.data for meta-training) to
    upload on ``wandb sync``; they are checked against the manifest's digests. Offline,
    versions count as the server would number them once synced: ``vN`` is the N-th distinct
    content logged under the name (in the runs' chronological order), and an alias
    ("latest", "best", ``step-<N>``) is the last version logged with it; an entity is
    ignored (offline runs have none).

    Args:
      ref: ``"name:version"``, ``"project/name:version"`` or ``"entity/project/name:version"``
        (version ``vN`` or an alias; ``"name"`` alone means ``name:latest``).
      num_steps: training horizon; defaults to the maximum episode length of meta-training.
      run_dir: a folder holding offline wandb runs (a meta-training run's out_dir, its
        wandb/ folder or one offline-run-* folder); None: load online.
      project: the wandb project of a ``"name:version"`` ref (online: else wandb's default
        project; offline: else any project).

    Returns:
      `(tx, theta, lopt)` as `load_optax` returns them.

    Raises:
      FileNotFoundError: offline, no such artifact or version under `run_dir`, or its staged
        files are gone (after ``wandb sync``: load it online).
      ValueError: the artifact is not of type `ARTIFACT_TYPE`, or a staged file changed.
    """
    import tempfile  # noqa: PLC0415

    path, _, version = ref.partition(":")
    parts = path.split("/")
    name, version = parts[-1], version or "latest"
    if len(parts) > 1:
        project = parts[-2]
    with tempfile.TemporaryDirectory(prefix="lopt-artifact-") as tmp:
        if run_dir is None:
            import wandb  # noqa: PLC0415 - only when loading from wandb

            full = ref if ":" in ref else f"{ref}:{version}"
            if len(parts) == 1 and project:
                full = f"{project}/{full}"
            artifact = wandb.Api().artifact(full)
            if artifact.type != ARTIFACT_TYPE:
                raise ValueError(
                    f"artifact {full} is of type {artifact.type!r}, not {ARTIFACT_TYPE!r}"
                )
            artifact.download(root=tmp)
        else:
            _copy_offline_artifact(run_dir, name, version, project, tmp)
        return load_optax(tmp, num_steps)


def _copy_offline_artifact(
    run_dir: str, name: str, version: str, project: str | None, dest: str
) -> None:
    """Copies the staged files of an offline-logged artifact version into `dest`."""
    import base64  # noqa: PLC0415
    import gzip  # noqa: PLC0415
    import hashlib  # noqa: PLC0415
    import json  # noqa: PLC0415
    import shutil  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    root = Path(run_dir)
    files = [root] if root.is_file() else list(root.rglob("run-*.wandb"))
    runs = []  # (start time, file, its artifact records) per run file
    for f in files:
        records = list(wandb_run_records(f))
        start = next((r.run.start_time.ToNanoseconds() for r in records if r.HasField("run")), 0)
        runs.append((start, str(f), [r.artifact for r in records if r.HasField("artifact")]))
    logged = [
        a
        for _, _, artifacts in sorted(runs)  # a resumed run's files in the order they ran
        for a in artifacts
        if a.name == name and (not project or not a.project or a.project == project)
    ]
    # Versions as the server numbers them: one per distinct content, in logging order.
    digests = list(dict.fromkeys(a.digest for a in logged))
    chosen = None
    for a in logged:
        if version in a.aliases or version == f"v{digests.index(a.digest)}":
            chosen = a  # the last one wins: an alias moves to the newest version
    if chosen is None:
        known = sorted(
            {f"v{i}" for i in range(len(digests))} | {x for a in logged for x in a.aliases}
        )
        raise FileNotFoundError(
            f"no offline wandb artifact {name}:{version} in {len(files)} run file(s) under "
            f"{root}" + (f"; versions and aliases found: {', '.join(known)}" if known else "")
        )
    if chosen.type != ARTIFACT_TYPE:
        raise ValueError(
            f"artifact {name}:{version} is of type {chosen.type!r}, not {ARTIFACT_TYPE!r}"
        )
    manifest = chosen.manifest
    if manifest.manifest_file_path:  # very large manifests live in a gzipped JSON-lines file
        with gzip.open(manifest.manifest_file_path, "rt") as f:
            entries = [json.loads(line) for line in f if line.strip()]
    else:
        entries = [
            {"path": e.path, "digest": e.digest, "local_path": e.local_path}
            for e in manifest.contents
        ]
    for entry in entries:
        source = Path(entry.get("local_path") or "")
        if not entry.get("local_path") or not source.is_file():
            raise FileNotFoundError(
                f"the staged file {source} of {name}:{version} ({entry['path']}) is gone "
                "(wandb may delete staged files once it uploaded them): load it online"
            )
        digest = base64.b64encode(hashlib.md5(source.read_bytes()).digest()).decode()
        if digest != entry["digest"]:
            raise ValueError(f"the staged file {source} of {name}:{version} changed since logging")
        target = Path(dest) / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def wandb_run_records(path: str) -> Any:
    """Reads a wandb run's transaction log (``run-<id>.wandb``, what ``wandb sync`` uploads).

    The file is in LevelDB's log format: a 7-byte header (``:W&B``, magic, version), then
    32 KiB blocks of chunks, each with a 7-byte header (CRC-32 of type and data, length,
    type: full, first, middle or last piece of a record); a block's tail too short for a
    header is padding. Reading stops at a torn or unwritten chunk (the end of a crashed run,
    or of one whose file wandb has not flushed yet).

    Args:
      path: the ``run-<id>.wandb`` file.

    Yields:
      Its records (`wandb.proto.wandb_internal_pb2.Record`: run, history, metric, artifact,
      exit, ...), in order.

    Raises:
      ValueError: the file is not a wandb transaction log.
    """
    import struct  # noqa: PLC0415
    import zlib  # noqa: PLC0415

    from wandb.proto import wandb_internal_pb2 as pb  # noqa: PLC0415

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    block, pos, pieces = 32768, 7, []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            return
        pos += 7 + length
        if kind in (1, 2):  # full, first
            pieces = [chunk]
        else:  # middle, last
            pieces.append(chunk)
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(pieces))
            yield record
