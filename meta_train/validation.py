"""Meta-validation during meta-training, and the guard that acts when it worsens.

Every `valid.every` outer steps the current meta-parameters θ train a fixed set of held-out
tasks (`validation_tasks`: drawn once per run from the family's held-out stream, other tasks
than the final evaluation's, spread over the family's templates and horizons; seeds fixed).
Each task's seeds run in one jitted, vmapped `lax.scan` with θ traced, so every validation
after the first reuses its compilation. The score compares the learned optimizer with Adam
at a fixed learning rate, run once at the start on the same tasks and seeds:

    score = mean over tasks of  value(learned) / value(Adam)

where value is the validation loss at the end of the run ('final') or its mean over the
recorded points ('mean'), each averaged over seeds. Lower is better; a diverged run makes
the score infinite. The meta-loss of meta-training cannot show this: it mixes windows of
every phase of the episodes, and a clipped loss hides divergence.

`Guard` keeps the best score and counts worse evaluations; it is pure Python over the
history of scores, so a resumed run replays the history and reaches the same state.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lopt.base import LearnedOptimizer
from lopt.export import as_optax
from lopt.hub import per_step_decay
from meta_train.config import GUARD_ACTIONS, VALID_METRICS, ConfigError
from meta_train.jit import jit
from tasks.epochs import steps_per_epoch

METRICS = VALID_METRICS
# Sub-stream of the run's held-out stream: validation tasks are never the evaluation's.
VALID_STREAM = 7


@dataclasses.dataclass(frozen=True)
class ValidTask:
    """One validation task.

    Attributes:
      task: the task (shape and numbers).
      info: its JSON-friendly description (`TaskFamily.sample_with_info`).
      horizon: training steps (the learned optimizer is told this horizon).
    """

    task: Any
    info: dict
    horizon: int


def valid_key(held_out_key: jax.Array) -> jax.Array:
    """The validation stream of a run's held-out key (tasks, then seeds from it)."""
    return jax.random.fold_in(held_out_key, VALID_STREAM)


def horizons(num_tasks: int, min_len: int, max_len: int) -> list[int]:
    """`num_tasks` horizons spread geometrically from `min_len` to `max_len` (inclusive)."""
    if num_tasks == 1 or min_len == max_len:
        return [max_len] * num_tasks
    ratio = max_len / min_len
    return [round(min_len * ratio ** (i / (num_tasks - 1))) for i in range(num_tasks)]


def validation_tasks(
    family, key: jax.Array, num_tasks: int, min_len: int, max_len: int
) -> list[ValidTask]:
    """The run's validation tasks: template i is item i of a seeded sequence of permutations
    of the family's templates (every template before any repeats), horizon i from `horizons`.

    Args:
      family: the task family (`sample_with_info(key, template)`, `num_templates`).
      key: the run's held-out key.
      num_tasks: how many tasks.
      min_len: the family's shortest episode length (the horizons meta-training sees).
      max_len: the family's longest episode length.

    Returns:
      The tasks, in order.
    """
    key = valid_key(key)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    order: list[int] = []
    while len(order) < num_tasks:
        order += [int(t) for t in rng.permutation(family.num_templates)]
    # Horizons are assigned in a shuffled order so templates and horizons do not pair up.
    hs = horizons(num_tasks, min_len, max_len)
    hs = [hs[i] for i in rng.permutation(num_tasks)]
    tasks = []
    for i in range(num_tasks):
        task, info = family.sample_with_info(jax.random.fold_in(key, i), template=order[i])
        tasks.append(ValidTask(task, info, hs[i]))
    return tasks


def _valid_curve(task: Any, tx: Any, num_steps: int, key: jax.Array, points: int) -> jax.Array:
    """Full-split validation loss at the start, every `num_steps // points` steps and at the
    end: the evaluation's training run (`evaluate.suite._train`), whose other outputs
    (final train and test metrics) XLA drops as unused."""
    # Imported here: evaluate.suite imports the config, whose checks import this module.
    from evaluate.suite import _train  # noqa: PLC0415

    return _train(task, tx, num_steps, key, max(num_steps // points, 1))["valid_curve"]


@jit(static_argnames=("lopt", "num_steps", "points", "transform"))
def learned_curves(
    lopt: LearnedOptimizer,
    theta: Any,
    task: Any,
    keys: jax.Array,
    num_steps: int,
    points: int,
    transform: Callable[..., Any] = as_optax,
) -> jax.Array:
    """Validation curves [seeds, evaluations] of `task` trained by `transform(lopt, theta,
    num_steps)` (`as_optax`: the rule itself); θ is traced, so new meta-parameters reuse the
    compilation."""
    tx = transform(lopt, theta, num_steps)
    return jax.vmap(lambda k: _valid_curve(task, tx, num_steps, k, points))(keys)


@jit(static_argnames=("num_steps", "points"))
def adam_curves(
    learning_rate: jax.Array, task: Any, keys: jax.Array, num_steps: int, points: int
) -> jax.Array:
    """The same curves for Adam at `learning_rate` (traced)."""
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)
    return jax.vmap(lambda k: _valid_curve(task, tx, num_steps, k, points))(keys)


def _spread(costs: Sequence[int], devices: Sequence[Any]) -> list[Any]:
    """A device per item, balancing the summed costs (longest first to the least loaded)."""
    load = [0] * len(devices)
    out: list[Any] = [None] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        d = min(range(len(devices)), key=lambda d: load[d])
        load[d] += costs[i]
        out[i] = devices[d]
    return out


def _values(curves: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, bool]:
    """Per task, the seed-mean final and mean (over points after the start) validation
    loss, and whether every number is finite."""
    curves = [np.asarray(c, np.float64) for c in curves]
    final = np.array([c[:, -1].mean() for c in curves])
    mean = np.array([c[:, 1:].mean() for c in curves])
    finite = all(bool(np.all(np.isfinite(c))) for c in curves)
    return final, mean, finite


class MetaValidator:
    """Scores meta-parameters on the run's validation tasks (see the module docstring).

    Args:
      lopt: the learned optimizer.
      tasks: the validation tasks (`validation_tasks`).
      key: seeds the training runs; every call uses the same seeds.
      num_seeds: seeds per task.
      points: validation losses recorded per run.
      adam_lr: the reference Adam's learning rate.
      metric: 'final' or 'mean'.

    Raises:
      ValueError: the Adam reference diverged on a task (a learning rate too large for the
        family).
    """

    def __init__(
        self,
        lopt: LearnedOptimizer,
        tasks: Sequence[ValidTask],
        key: jax.Array,
        *,
        num_seeds: int = 2,
        points: int = 10,
        adam_lr: float = 1e-3,
        metric: str = "final",
    ):
        if metric not in METRICS:
            raise ValueError(f"unknown validation metric {metric!r}; known: {METRICS}")
        self.lopt, self.metric, self.points = lopt, metric, points
        # One learned optimizer per task instead of `lopt` for all (a setting that follows
        # each task's data, `evaluate.measure.valid_sweep`'s per-epoch decay); None: `lopt`.
        self.task_lopts: list[LearnedOptimizer] | None = None
        # How a rule becomes the optax transformation it is scored as: the rule itself, or a
        # wrapper such as `lopt.hub.orthogonalised_rule` (`evaluate.measure.valid_sweep`).
        self.transform: Callable[..., Any] = as_optax
        # Tasks are spread over the devices (longest horizon first to the least loaded): on
        # a CPU split into one device per core they train in parallel (1.4-1.6x faster here).
        # Their programs hold no collectives, so running at once cannot deadlock.
        self.devices = _spread([t.horizon for t in tasks], jax.local_devices())
        self.tasks = [
            dataclasses.replace(t, task=jax.device_put(t.task, d))
            for t, d in zip(tasks, self.devices, strict=True)
        ]
        self.seed_keys = [
            jax.device_put(jax.random.split(jax.random.fold_in(key, i), num_seeds), d)
            for i, d in enumerate(self.devices)
        ]
        t0 = time.perf_counter()
        curves = [
            adam_curves(jnp.float32(adam_lr), t.task, k, t.horizon, self._points(t))
            for t, k in zip(self.tasks, self.seed_keys, strict=True)
        ]
        self.adam_final, self.adam_mean, finite = _values(jax.device_get(curves))
        self.adam_seconds = time.perf_counter() - t0
        if not finite:
            raise ValueError(
                f"the meta-validation reference, Adam at learning rate {adam_lr:g}, diverged "
                "on a validation task; set a smaller valid.adam_lr"
            )

    def _points(self, task: ValidTask) -> int:
        return min(self.points, task.horizon)

    def __call__(self, theta: Any) -> dict[str, float]:
        """Trains every validation task with `lopt(theta)`.

        Returns:
          `score` (see the module docstring; inf when a run diverged), `final_loss` and
          `mean_loss` (mean over tasks of the seed-mean values), `ratio_final` and
          `ratio_mean` (mean over tasks of the ratios to Adam), `task<i>_ratio` (task i's
          term of the score), `diverged` (1.0 when a number was not finite) and `seconds`
          (wall time of this call).
        """
        jax.block_until_ready(theta)  # nothing of training in flight: time only this
        t0 = time.perf_counter()
        on = {d: jax.device_put(theta, d) for d in set(self.devices)}
        # Dispatched without waiting: the devices work at once; device_get waits for all.
        lopts = self.task_lopts or [self.lopt] * len(self.tasks)
        curves = [
            learned_curves(lopt, on[d], t.task, k, t.horizon, self._points(t), self.transform)
            for t, k, d, lopt in zip(self.tasks, self.seed_keys, self.devices, lopts, strict=True)
        ]
        final, mean, finite = _values(jax.device_get(curves))
        ratios = final / self.adam_final if self.metric == "final" else mean / self.adam_mean
        ratio_final = float(np.mean(final / self.adam_final))
        ratio_mean = float(np.mean(mean / self.adam_mean))
        ratio = float(np.mean(ratios))  # ratio_final or ratio_mean, by the metric
        return {
            # Which tasks lag: the score's per-task terms, in `describe()`'s order.
            **{f"task{i}_ratio": float(r) for i, r in enumerate(ratios)},
            "score": ratio if finite and math.isfinite(ratio) else math.inf,
            "final_loss": float(np.mean(final)),
            "mean_loss": float(np.mean(mean)),
            "ratio_final": ratio_final,
            "ratio_mean": ratio_mean,
            "diverged": 0.0 if finite else 1.0,
            "seconds": time.perf_counter() - t0,
        }

    def describe(self) -> list[dict]:
        """The tasks, their horizons and Adam's values, for the run's summary."""
        return [
            {**t.info, "horizon": t.horizon, "adam_final": float(f), "adam_mean": float(m)}
            for t, f, m in zip(self.tasks, self.adam_final, self.adam_mean, strict=True)
        ]


@dataclasses.dataclass
class Guard:
    """The best score so far and the guard against a worsening run.

    An evaluation is *worse* when its score exceeds the best by more than `margin` × best
    (or is not finite). After `patience` worse evaluations in a row the guard fires: it says
    so, and with `action='lower_lr'` multiplies `lr_scale` by `lr_factor`; with 'stop' it
    sets `stop`. The count then starts again.

    Attributes:
      margin, patience, action, lr_factor: the settings (see `ValidConfig`).
      best_score, best_step: the best evaluation so far (inf, None before any).
      worse: worse evaluations in a row.
      lr_scale: the outer learning rate's multiplier.
      stop: the run should end.
      fired: outer steps at which the guard fired.
    """

    margin: float = 0.05
    patience: int = 3
    action: str = "lower_lr"
    lr_factor: float = 0.5
    best_score: float = math.inf
    best_step: int | None = None
    worse: int = 0
    lr_scale: float = 1.0
    stop: bool = False
    fired: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.action not in GUARD_ACTIONS:
            raise ValueError(f"unknown guard action {self.action!r}; known: {GUARD_ACTIONS}")

    def observe(self, step: int, score: float) -> tuple[bool, str | None]:
        """Takes the score of the evaluation after `step` outer steps.

        Returns:
          `(is_best, message)`: whether it is a new best (strictly lower, finite), and the
          guard's message when it fired (else None).
        """
        if math.isfinite(score) and score < self.best_score:
            self.best_score, self.best_step, self.worse = score, step, 0
            return True, None
        limit = self.best_score * (1.0 + self.margin)
        if math.isfinite(score) and score <= limit:
            self.worse = 0
            return False, None
        self.worse += 1
        if self.worse < self.patience:
            return False, None
        self.worse = 0
        self.fired.append(step)
        what = f"meta-validation score {score:.4g} has been worse than the best"
        what += f" ({self.best_score:.4g} at step {self.best_step}) by more than"
        what += f" {self.margin:.0%} for {self.patience} evaluations in a row"
        if self.action == "lower_lr":
            self.lr_scale *= self.lr_factor
            return False, f"{what}; outer learning rate × {self.lr_scale:g} from now on"
        if self.action == "stop":
            self.stop = True
            return False, f"{what}; stopping (the best checkpoint is step {self.best_step})"
        return False, f"{what} (valid.guard_action='warn': going on)"

    def replay(self, history: Sequence[dict]) -> None:
        """Observes a saved history (`{'step', 'score'}` records) again, silently."""
        for record in history:
            score = record["score"]
            self.observe(int(record["step"]), math.inf if score is None else float(score))


def build_validator(run, horizon_scale: int = 1) -> MetaValidator:
    """The validator of a `meta_train.build.Run` (its `valid` and `meta` settings).

    Args:
      run: the run.
      horizon_scale: every task's horizon multiplied by this (the same tasks and seeds,
        trained `horizon_scale` times longer: how a setting does past the episode lengths
        of meta-training; `evaluate.measure.valid_sweep --horizon-scale`).

    Returns:
      The validator.
    """
    if not (isinstance(horizon_scale, int) and horizon_scale >= 1):
        raise ValueError(f"horizon_scale must be an integer >= 1, got {horizon_scale!r}")
    v, m = run.config.valid, run.config.meta
    tasks = validation_tasks(
        run.family, run.held_out_key(), v.num_tasks, m.min_episode_len, m.max_episode_len
    )
    tasks = [dataclasses.replace(t, horizon=t.horizon * horizon_scale) for t in tasks]
    validator = MetaValidator(
        run.lopt,
        tasks,
        jax.random.fold_in(valid_key(run.held_out_key()), 1_000_000),
        num_seeds=v.num_seeds,
        points=v.points,
        adam_lr=v.adam_lr,
        metric=v.metric,
    )
    if v.weight_decay_per_epoch:
        validator.task_lopts = per_epoch_decay_lopts(
            run.lopt, validator.tasks, v.weight_decay_per_epoch
        )
    return validator


def per_epoch_decay_lopts(
    lopt: LearnedOptimizer,
    tasks: Sequence[ValidTask],
    per_epoch: float,
    floor: float = 0.0,
    fewest: float = 1.0,
    exponent: float = 1.0,
) -> list[LearnedOptimizer]:
    """`lopt` once per task, each with weight decay `max(per_step_decay(per_epoch, S,
    fewest, exponent), floor)` per step (`lopt.hub.per_step_decay`; `per_epoch / S` by
    default), S the task's steps per epoch (`tasks.epochs.steps_per_epoch`), as
    `lopt.pretrained` applies the index's decay per epoch.

    Raises:
      ConfigError: `lopt` has no `weight_decay` option, or a task's steps per epoch are
        unknown.
    """
    if not any(f.name == "weight_decay" for f in dataclasses.fields(lopt)):
        raise ConfigError(
            f"a weight decay per epoch needs a learned optimizer with a weight_decay option; "
            f"{type(lopt).__name__} has none"
        )
    steps = [steps_per_epoch(t.task) for t in tasks]
    if None in steps:
        raise ConfigError("a weight decay per epoch: a validation task of unknown steps per epoch")
    return [
        dataclasses.replace(
            lopt, weight_decay=max(per_step_decay(per_epoch, n, fewest, exponent), floor)
        )
        for n in steps
    ]


def make_guard(run) -> Guard:
    """The guard of a run, from its `valid` settings."""
    v = run.config.valid
    return Guard(v.guard_margin, v.guard_patience, v.guard_action, v.guard_lr_factor)
