"""The learned optimizers this project ships, by name (`lopt.pretrained`), in one line:

    import lopt
    lopt.pretrained()                                   # the names of what ships
    tx = lopt.pretrained("generalist-ortho", num_steps=5000)  # an optax transformation

Shipped optimizers live in the repository's `checkpoints/` (one folder per name: the orbax
checkpoint, a model card `README.md`, tables and curves). `checkpoints/shipped.json` lists
them, with a description, the horizon they default to, settings chosen after
meta-training on the optimizer's own meta-validation tasks with `python -m
evaluate.measure.valid_sweep` (a fixed `weight_decay`; a `weight_decay_per_epoch` that
`steps_per_epoch=` spreads over a pass over the caller's data; `options`, other fields of the
rule such as `width_scale_max`) and a SHA-256 of their weights; every
load recomputes the hash and refuses weights that do not match, so a truncated download or
an edited file is an error, never a silently different optimizer. An installed wheel
carries the same folders as `lopt/shipped/` (see `setup.py`); a checkout reads
`checkpoints/` itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lopt.base import step_scale
from lopt.common import rms_normalise

INDEX = "shipped.json"
"""The index of shipped optimizers, in the shipped folder."""

_REPO_DIR = Path(__file__).resolve().parents[1] / "checkpoints"
_WHEEL_DIR = Path(__file__).resolve().parent / "shipped"


class PretrainedError(ValueError):
    """An unknown name, or shipped weights that are missing or fail their hash."""


def shipped_dir() -> Path:
    """The folder that holds the shipped optimizers: `lopt/shipped` in an installed wheel,
    the repository's `checkpoints/` in a checkout."""
    for folder in (_WHEEL_DIR, _REPO_DIR):
        if (folder / INDEX).is_file():
            return folder
    raise PretrainedError(
        f"no shipped optimizers found: neither {_WHEEL_DIR / INDEX} nor {_REPO_DIR / INDEX} "
        "exists (a wheel built without its checkpoints?)"
    )


def _index() -> dict[str, dict[str, Any]]:
    with open(shipped_dir() / INDEX) as f:
        return json.load(f)


def weights_sha256(folder: str | Path) -> str:
    """SHA-256 over a shipped optimizer's weights: every file of its checkpoint step folders
    (digit-named) and its `best.json`, in sorted path order, each path and content hashed.

    Model cards, tables and figures are not weights and are not hashed.

    Args:
      folder: the optimizer's folder (e.g. `checkpoints/generalist`).

    Returns:
      The hex digest.
    """
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.is_file()]
    weights = sorted(
        p
        for p in files
        if p.relative_to(folder).parts[0].isdigit()
        or p.relative_to(folder).as_posix() == "best.json"
    )
    h = hashlib.sha256()
    for p in weights:
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def verified_folder(name: str) -> tuple[Path, dict[str, Any]]:
    """A shipped optimizer's checkpoint folder, its weights checked against their hash.

    Args:
      name: one of `pretrained()`.

    Returns:
      `(folder, entry)`: the checkpoint folder (that of the entry's `weights`, the name of
      the shipped optimizer whose weights it shares, where it gives one) and the
      optimizer's index entry.

    Raises:
      PretrainedError: for an unknown name, a missing folder or a hash mismatch.
    """
    index = _index()
    if name not in index:
        raise PretrainedError(f"no shipped optimizer {name!r}; shipped: {sorted(index)}")
    entry = index[name]
    # Another shipped optimizer's weights with other settings (`weights`: its name); this
    # name's own folder then holds only its model card.
    folder = shipped_dir() / entry.get("weights", name)
    if not folder.is_dir():
        raise PretrainedError(f"shipped optimizer {name!r}: its folder {folder} is missing")
    digest = weights_sha256(folder)
    if digest != entry["sha256"]:
        raise PretrainedError(
            f"shipped optimizer {name!r}: its weights in {folder} do not match their hash "
            f"(expected {entry['sha256'][:16]}..., got {digest[:16]}...): corrupt or edited"
        )
    return folder, entry


def load_pretrained(
    name: str,
    num_steps: int | None = None,
    weight_decay: float | None = None,
    steps_per_epoch: float | None = None,
):
    """A shipped optimizer with its meta-parameters, checked against its hash.

    Args:
      name: one of `pretrained()`.
      num_steps: the training horizon (>= 1; default: the one the index gives, the
        horizon the optimizer was meta-trained or evaluated at).
      weight_decay: decoupled weight decay per step, on the rule's own schedule (the
        per-parameter MLP's `weight_decay` option; None: the index's, see below, else the
        checkpoint's).
      steps_per_epoch: training steps per pass over your training data (examples ÷ batch
        size; `tasks.epochs.steps_per_epoch` computes it for this project's tasks). With it,
        the decay is the index's `weight_decay_per_epoch` ÷ `steps_per_epoch`: the same
        shrinkage per pass over the data, strong on a small dataset seen many times and
        weak on a large one (docs/generalist.md); below the index's `min_steps_per_epoch`
        (the fewest it was chosen on) the decay stays at its value there, and an index
        `weight_decay_epoch_exponent` below 1 makes it fall more slowly on large datasets
        (`per_step_decay`). Without it, or
        where the index gives no per-epoch decay, the index's fixed `weight_decay`; an
        explicit `weight_decay` wins.

    Returns:
      `(tx, theta, lopt)`, as `lopt.export.load_optax`; for an index entry marked
      `orthogonalised`, `tx` is the rule with its 2-D steps orthogonalised
      (`orthogonalised_rule`) and `lopt` the rule inside it.

    Raises:
      PretrainedError: for an unknown name, missing weights, a hash mismatch or an index
        option the rule does not have.
      ValueError: `steps_per_epoch` not positive.
    """
    if steps_per_epoch is not None and not steps_per_epoch > 0:
        raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
    folder, entry = verified_folder(name)
    from lopt.export import as_optax, load_rule  # noqa: PLC0415 - orbax is heavy

    horizon = int(entry["num_steps"]) if num_steps is None else num_steps
    lopt, theta, _ = load_rule(str(folder), step=entry.get("step"))
    per_epoch = entry.get("weight_decay_per_epoch")
    if weight_decay is None and steps_per_epoch is not None and per_epoch is not None:
        weight_decay = per_step_decay(
            float(per_epoch),
            float(steps_per_epoch),
            fewest=float(entry.get("min_steps_per_epoch", 1.0)),
            exponent=float(entry.get("weight_decay_epoch_exponent", 1.0)),
        )
    if weight_decay is None:  # the index may ship the rule with a decay chosen after training
        weight_decay = entry.get("weight_decay")
    # Options chosen after meta-training (on meta-validation, like the decay): not
    # meta-parameters, so they live in the index rather than in the checkpoint.
    changes = dict(entry.get("options", {}))
    if weight_decay is not None:
        changes["weight_decay"] = float(weight_decay)
    if changes:
        fields = {f.name for f in dataclasses.fields(lopt)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise PretrainedError(
                f"shipped optimizer {name!r} ({type(lopt).__name__}) has no option(s) "
                f"{', '.join(unknown)}"
            )
        lopt = dataclasses.replace(lopt, **changes)  # checks their ranges
    if not entry.get("orthogonalised"):
        return as_optax(lopt, theta, horizon), theta, lopt
    try:  # shipped with its 2-D steps orthogonalised
        return orthogonalised_rule(lopt, theta, horizon), theta, lopt
    except TypeError as e:
        raise PretrainedError(f"shipped optimizer {name!r}: {e}") from e


def per_step_decay(
    per_epoch: float, steps_per_epoch: float, fewest: float = 1.0, exponent: float = 1.0
) -> float:
    """The decoupled weight decay per step that a decay per epoch gives on a dataset of
    `steps_per_epoch` steps per pass: `per_epoch / fewest * (fewest / S) ** exponent`, S the
    steps per epoch held at or above `fewest`.

    With `exponent` 1 it is `per_epoch / S`: the same shrinkage per pass over the data,
    whatever the dataset's size. Below 1 the decay falls more slowly than 1 / S on large
    datasets, so a rule that overfits in a long run on a dataset seen a few times still gets
    decay there, while a small dataset seen many times (S = `fewest`) keeps `per_epoch /
    fewest` (docs/generalist.md, "A decay between per step and per epoch").

    Args:
      per_epoch: the decay per pass over the data, at `fewest` steps per epoch.
      steps_per_epoch: training steps per pass over the data (> 0).
      fewest: the fewest steps per epoch the decay was chosen on; below it the decay stays
        at its value there (`per_epoch / S` grows without bound as S -> 1, full batch).
      exponent: how fast the decay falls with the steps per epoch, in (0, 1].

    Returns:
      The decay per step.

    Raises:
      ValueError: `steps_per_epoch` or `fewest` not positive, `exponent` outside (0, 1].
    """
    if not steps_per_epoch > 0 or not fewest > 0:
        raise ValueError(f"steps per epoch must be > 0, got {steps_per_epoch} (fewest {fewest})")
    if not 0.0 < exponent <= 1.0:
        raise ValueError(f"the decay's epoch exponent must be in (0, 1], got {exponent}")
    steps = max(float(steps_per_epoch), float(fewest))
    return float(per_epoch) / fewest * (fewest / steps) ** exponent


def pretrained(
    name: str | None = None,
    num_steps: int | None = None,
    weight_decay: float | None = None,
    steps_per_epoch: float | None = None,
) -> list[str] | optax.GradientTransformationExtraArgs:
    """A shipped learned optimizer as an optax transformation, or the list of them.

    Args:
      name: which one; None lists the names.
      num_steps: the number of steps you will train for (>= 1; default: the optimizer's
        own, see `checkpoints/NAME/README.md`).
      weight_decay: decoupled weight decay per step, on the rule's step schedule (None: the
        one it shipped with; see its model card for what was measured).
      steps_per_epoch: training steps per pass over your training data (examples ÷ batch
        size): the shipped decay per epoch is spread over them (`load_pretrained`).

    Returns:
      With a name, an `optax.GradientTransformationExtraArgs` whose
      `update(grads, state, params, loss=loss)` needs `params` and the training loss;
      without one, the sorted names of what ships.
    """
    if name is None:
        return sorted(_index())
    return load_pretrained(name, num_steps, weight_decay, steps_per_epoch)[0]


def describe() -> dict[str, str]:
    """Each shipped optimizer's one-line description, by name."""
    return {name: entry["description"] for name, entry in sorted(_index().items())}


def harness(
    name: str,
    num_steps: int,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    orthogonalise: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """A shipped learned rule inside a Celo2-style harness built from optax's own parts.

    2-D kernels take the rule's RMS-normalised direction (`lopt.export.scale_by_learned`),
    orthogonalised by Newton-Schulz iterations (`optax.contrib.scale_by_muon` without
    momentum, so it only orthogonalises), decoupled weight decay and a cosine schedule from
    `learning_rate`; biases, norm scales, embeddings' other shapes and every non-2-D leaf
    take `optax.adamw` on the same schedule (`optax.multi_transform`). After Moudgil,
    Knyazev, Belilovsky, "Celo2" (ICLR 2026).

    Args:
      name: a shipped optimizer (`pretrained()`).
      num_steps: the training horizon (>= 1): the rule's progress features and the
        schedule's length.
      learning_rate: the schedule's peak: the RMS step of each 2-D tensor, and AdamW's rate.
      weight_decay: decoupled weight decay of both parts.
      orthogonalise: Newton-Schulz on the 2-D updates (False: the plain normalised rule).

    Returns:
      A `GradientTransformationExtraArgs` that needs `params` and `loss=`, as
      `pretrained(name)`.
    """
    from lopt.export import scale_by_learned  # noqa: PLC0415

    _, theta, lopt = load_pretrained(name, num_steps)
    if getattr(lopt, "weight_decay", 0.0):  # the harness decays weights itself, once
        lopt = dataclasses.replace(lopt, weight_decay=0.0)
    schedule = optax.cosine_decay_schedule(learning_rate, max(int(num_steps), 1))
    parts = [scale_by_learned(lopt, theta, num_steps)]
    if orthogonalise:
        # Every leaf this part sees is a 2-D kernel [in, out] (the labels below).
        dims = optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=1)
        parts.append(
            optax.contrib.scale_by_muon(
                beta=0.0,
                nesterov=False,
                weight_dimension_numbers=lambda u: jax.tree.map(lambda _: dims, u),
            )
        )
    parts += [optax.add_decayed_weights(weight_decay), optax.scale_by_learning_rate(schedule)]
    matrices = optax.chain(*parts)
    others = optax.adamw(schedule, weight_decay=weight_decay)

    return optax.multi_transform({"matrix": matrices, "other": others}, _matrix_labels)


def orthogonalised(
    name: str,
    num_steps: int,
    steps_per_epoch: float | None = None,
    weight_decay: float | None = None,
    ns_steps: int = 5,
) -> optax.GradientTransformationExtraArgs:
    """A shipped rule with each 2-D step orthogonalised at the rule's own size: no learning
    rate to choose.

    The rule computes its step as `pretrained(name)` does. Then every 2-D kernel's step is
    replaced by its orthogonalisation (Newton-Schulz iterations, `optax.contrib.scale_by_muon`
    without momentum: the rule's features already hold momenta), rescaled to the step's own
    root mean square. So the rule sets each tensor's step size (its learned magnitude,
    schedule and width scaling) and the orthogonalisation only evens out the step's singular
    values, as Muon does for momentum (Jordan et al., 2024). Every other leaf keeps the
    rule's step. The rule's decoupled weight decay is added after, on the rule's own schedule,
    so it is not orthogonalised. Its cost is the iterations' matmuls: on the benchmark's small
    CPU models, several times the rule's step (docs/generalist.md).

    Args:
      name: a shipped optimizer (`pretrained()`) with a `weight_decay` option.
      num_steps: the training horizon (>= 1).
      steps_per_epoch: steps per pass over your training data, for the shipped decay per
        epoch (`load_pretrained`).
      weight_decay: decoupled weight decay per step (None: the shipped one).
      ns_steps: Newton-Schulz iterations per step.

    Returns:
      A `GradientTransformationExtraArgs` that needs `params` and `loss=`, as
      `pretrained(name)`.
    """
    _, theta, lopt = load_pretrained(name, num_steps, weight_decay, steps_per_epoch)
    try:
        return orthogonalised_rule(lopt, theta, num_steps, ns_steps)
    except TypeError as e:
        raise PretrainedError(f"{name!r}: {e}") from e


def orthogonalised_rule(
    lopt: Any, theta: Any, num_steps: int, ns_steps: int = 5
) -> optax.GradientTransformationExtraArgs:
    """`lopt.export.as_optax(lopt, theta, num_steps)` with every 2-D step orthogonalised at
    its own size and the rule's `weight_decay` added after (`orthogonalised`, which applies
    it to a shipped rule; meta-validation scores a run's θ with it through
    `evaluate.measure.valid_sweep --orthogonalised`).

    Args:
      lopt: a learned optimizer with a `weight_decay` option.
      theta: its meta-parameters.
      num_steps: the training horizon (>= 1).
      ns_steps: Newton-Schulz iterations per step.

    Returns:
      A `GradientTransformationExtraArgs` that needs `params` and `loss=`.

    Raises:
      TypeError: `lopt` has no `weight_decay` option.
    """
    from lopt.export import as_optax  # noqa: PLC0415

    if not hasattr(lopt, "weight_decay"):
        raise TypeError(
            f"{type(lopt).__name__} has no weight_decay option, so its decay cannot be kept "
            "out of the orthogonalisation"
        )

    step = as_optax(dataclasses.replace(lopt, weight_decay=0.0), theta, num_steps)
    shaped = optax.multi_transform(
        {"matrix": _orthogonalised_at_own_rms(ns_steps), "other": optax.identity()},
        _matrix_labels,
    )
    return optax.chain(step, shaped, _decay_on_rule_schedule(lopt, num_steps))


def _matrix_labels(params: Any) -> Any:
    """'matrix' for the float 2-D leaves the orthogonalisation takes, 'other' elsewhere."""

    def label(p):
        floating = jnp.issubdtype(jnp.asarray(p).dtype, jnp.floating)
        return "matrix" if floating and jnp.ndim(p) == 2 else "other"

    return jax.tree.map(label, params)


def _orthogonalised_at_own_rms(ns_steps: int) -> optax.GradientTransformation:
    """2-D [in, out] updates orthogonalised by `optax.contrib.scale_by_muon` (no momentum),
    each rescaled to the root mean square it came in with."""
    dims = optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=1)
    muon = optax.contrib.scale_by_muon(
        ns_steps=ns_steps,
        beta=0.0,
        nesterov=False,
        weight_dimension_numbers=lambda u: jax.tree.map(lambda _: dims, u),
    )

    def update(updates, state, params=None):
        # In float32: optax's iterations run in the update's dtype, and in float16 their
        # epsilon (1e-8) rounds to 0, so a zero step became 0 / 0 = NaN.
        wide = jax.tree.map(lambda u: u.astype(jnp.float32), updates)
        out, state = muon.update(wide, state, params)

        def rescale(u, o):  # a zero step stays zero (its orthogonalisation is zero too)
            size = jnp.sqrt(jnp.mean(jnp.square(u.astype(jnp.float32))))
            return (rms_normalise(o.astype(jnp.float32)) * size).astype(u.dtype)

        return jax.tree.map(rescale, updates, out), state

    def init(params):  # the state of float32 steps, as `update` passes them
        return muon.init(jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params))

    return optax.GradientTransformation(init, update)


class _DecayState(NamedTuple):
    count: jax.Array


def _decay_on_rule_schedule(lopt: Any, num_steps: int) -> optax.GradientTransformation:
    """Adds `-weight_decay * s(t) * p`, the rule's own decoupled decay (`lopt.base.step_scale`:
    its schedule and past-horizon decay), for float leaves."""
    horizon = jnp.asarray(num_steps, jnp.int32)

    def init(params):
        del params
        return _DecayState(jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("the orthogonalised rule needs params (its weight decay)")
        rate = step_scale(lopt, state.count, horizon, lopt.weight_decay)

        def decayed(u, p):
            if not jnp.issubdtype(jnp.asarray(u).dtype, jnp.floating):
                return u
            return (u - rate * p.astype(jnp.float32)).astype(u.dtype)

        return jax.tree.map(decayed, updates, params), _DecayState(state.count + 1)

    return optax.GradientTransformation(init, update)
