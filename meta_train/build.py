"""Builds a run's pieces (task family, learned optimizer, estimator, learner) from a config."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from lopt.base import LearnedOptimizer
from lopt.checkpoint import load_theta
from lopt.hub import PretrainedError, verified_folder
from lopt.registry import make_lopt
from meta_train.checkpoint import as_saved
from meta_train.config import Config, ConfigError
from meta_train.devices import (
    estimator_shardings,
    shard_learner_state,
    wait_if_collectives,
    with_shardings,
)
from meta_train.estimators import WindowObjective, make_estimator
from meta_train.groups import TemplateSchedule
from meta_train.jit import jit
from meta_train.learner import (
    LearnerState,
    estimate_group,
    estimate_step,
    flat_estimate_step,
    grouped_estimate,
    grouped_outer_step,
    init_learner,
    learner_keys,
    outer_optimizer,
    pack_metrics,
)
from meta_train.learner import outer_step as fused_outer_step
from meta_train.lopt_problem import LOptProblem
from meta_train.unroll import EpisodeSchedule
from tasks.family import TaskFamily

# Independent random streams of a run: tasks seen in meta-training never reuse the keys of
# the held-out evaluation tasks.
TRAIN_STREAM, HELD_OUT_STREAM = 0, 1
# Sub-stream of TRAIN_STREAM for groups' fresh particles after a template switch.
_SWITCH_STREAM = 2
# Sub-stream of the particles' key for gradient workers other than the first one's first
# incarnation (`Run.worker_keys`).
_WORKER_STREAM = 3


@jit()
def _init_group(estimator, theta, key: jax.Array, group: jax.Array):
    """Fresh particles of `estimator`'s groups, numbered from `group` (traced): a one-group
    estimator's after a template switch, compiled once per template, or a gradient worker's
    of every group (`group` 0)."""
    return estimator.init(key, theta, group)


def initial_theta(init_from: str, lopt_config: dict, fresh):
    """The meta-parameters of a checkpoint, to start a run from (`meta.init_from`).

    Args:
      init_from: a checkpoint directory (its best step, as `lopt.checkpoint.load_theta`
        picks) or the name of a shipped optimizer (`lopt.pretrained()`; its hash is checked).
        A path that exists wins over a shipped name.
      lopt_config: the run's `[lopt]` section (`{"kind": ..., **options}`).
      fresh: freshly drawn meta-parameters of the run's learned optimizer: the structure,
        shapes and dtypes the loaded ones must have.

    Returns:
      The checkpoint's meta-parameters in the structure of `fresh`.

    Raises:
      ConfigError: the checkpoint's learned optimizer is of another kind, or its network
        does not fit the run's (each differing leaf named); the message also names `[lopt]`
        options that differ. Other option differences (a switch such as `width_scale_max`
        changed on purpose) pass with a warning.
      ConfigError: `init_from` is neither a folder nor a shipped name, or its hash fails.
      CheckpointError: the folder holds no loadable checkpoint.
    """
    folder = Path(init_from)
    if not folder.exists() and "/" not in init_from:
        try:
            folder = verified_folder(init_from)[0]
        except PretrainedError as e:  # neither a folder nor a shipped name: a user error
            raise ConfigError(f"meta.init_from={init_from!r}: no such folder, and {e}") from e
    loaded, saved = load_theta(str(folder))
    saved_lopt = dict(saved.get("lopt", {}))
    # A key the checkpoint lacks was added since, with a default that keeps older rules.
    differ = sorted(
        k
        for k in set(saved_lopt) & set(lopt_config)
        if as_saved(saved_lopt[k]) != as_saved(lopt_config[k])
    )
    shown = ", ".join(
        f"{k}: {saved_lopt.get(k)!r} there, {lopt_config.get(k)!r} here" for k in differ
    )
    if saved_lopt.get("kind") != lopt_config.get("kind"):
        raise ConfigError(f"meta.init_from={init_from!r} holds another learned optimizer ({shown})")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(fresh)
    want = {jax.tree_util.keystr(k): v for k, v in leaves}
    got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
    misfits = [
        f"{k}: {tuple(got[k].shape) if k in got else 'missing'} there, "
        f"{tuple(want[k].shape) if k in want else 'absent'} here"
        for k in sorted(set(want) | set(got))
        if k not in got or k not in want or tuple(got[k].shape) != tuple(want[k].shape)
    ]
    if misfits:
        raise ConfigError(
            f"meta.init_from={init_from!r}: its meta-parameters do not fit this run's "
            f"learned optimizer ({'; '.join(misfits[:6])}"
            f"{'; ...' if len(misfits) > 6 else ''})"
            + (f"; [lopt] differs: {shown}" if shown else "")
        )
    if differ:
        warnings.warn(
            f"meta.init_from={init_from!r}: [lopt] differs from its run ({shown})", stacklevel=3
        )
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(got[k], v.dtype) for k, v in want.items()]
    )


@dataclasses.dataclass(eq=False)
class Run:
    """The pieces of a meta-training run.

    Attributes:
      config: the validated config.
      family: the task family (its templates).
      lopt: the learned optimizer.
      estimator: the estimator over the groups' templates at the start of the run.
      outer_opt: the outer optimizer.
      schedule: which template each group holds at every outer step.
    """

    config: Config
    family: TaskFamily
    lopt: LearnedOptimizer
    estimator: object
    outer_opt: object
    schedule: TemplateSchedule
    _problems: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def templates(self) -> list[int]:
        """The groups' templates at the start of the run."""
        return list(self.schedule.templates_at(0))

    @property
    def switching(self) -> bool:
        return self.config.meta.switch_every > 0

    def _key(self) -> jax.Array:
        return jax.random.fold_in(jax.random.PRNGKey(self.config.run.seed), TRAIN_STREAM)

    def problem(self, template: int) -> LOptProblem:
        """Training tasks of `template` with the learned optimizer (built once)."""
        if template not in self._problems:
            self._problems[template] = lopt_problem(self.config, self.family, self.lopt, template)
        return self._problems[template]

    def group_estimator(self, template: int):
        """A one-group estimator of `template` (equal templates give equal estimators)."""
        return self.estimator.replace(problems=(self.problem(template),))

    def estimator_for(self, templates) -> object:
        """The estimator over groups of these templates."""
        return self.estimator.replace(problems=tuple(self.problem(t) for t in templates))

    @functools.cached_property
    def start_theta(self):
        """The meta-parameters a new run starts from: `meta.init_from`'s, else drawn from
        the seed. Loaded once; `meta_train` asks before it writes anything, so a bad
        `init_from` fails first."""
        fresh = self.lopt.init_meta(jax.random.split(self._key())[0])
        if not self.config.meta.init_from:
            return fresh
        return initial_theta(self.config.meta.init_from, self.config.lopt.to_dict(), fresh)

    def init_state(self) -> LearnerState:
        """The initial learner state, particles sharded across devices."""
        return self.place(self._initial_state())

    def _initial_state(self, templates=None, particles: bool = True) -> LearnerState:
        k_learner = jax.random.split(self._key())[1]
        theta = jax.tree.map(jnp.array, self.start_theta)  # a copy: the learner may donate it
        est = self.estimator if templates is None else self.estimator_for(templates)
        return init_learner(est if particles else None, theta, self.outer_opt, k_learner)

    def init_server_state(self) -> LearnerState:
        """The gradient server's initial learner state: the in-process run's θ and outer
        state, and no particles (workers own them)."""
        return self.place_server(self._initial_state(particles=False))

    @staticmethod
    def place_server(state: LearnerState) -> LearnerState:
        """A particle-free learner state on one device: the update of θ is too small to gain
        from several, and a replicated one would run on each."""
        return jax.device_put(state, jax.devices()[0])

    def worker_keys(self, index: int, incarnation: int = 0) -> tuple[jax.Array, jax.Array]:
        """(particles' key, estimate keys' key) of gradient worker `index` after
        `incarnation` replacements. Worker 0's first incarnation draws the in-process run's
        keys, so one synchronous worker reproduces it; the others, and every replacement,
        draw fresh streams."""
        k_est, k_run = learner_keys(jax.random.split(self._key())[1])
        if index or incarnation:
            ids = (_WORKER_STREAM, index, incarnation)
            k_est, k_run = (functools.reduce(jax.random.fold_in, ids, k) for k in (k_est, k_run))
        return k_est, k_run

    def init_particles(self, theta, key: jax.Array):
        """Fresh particles of the groups' first templates, placed across devices."""
        est = _init_group(self.estimator, theta, key, jnp.int32(0))
        return jax.device_put(est, estimator_shardings(est, self._pairs_per_group))

    def estimate(self, est_state, theta, key: jax.Array, step: int):
        """The estimate half of outer step `step` (a worker's own count of estimates) on
        particles `est_state` (consumed): switches a group's template first when the
        schedule says so.

        Returns:
          The flat meta-gradient, the new particles and the window's metrics.
        """
        if not self.switching:
            return wait_if_collectives(estimate_step(self.estimator, est_state, theta, key))
        est_state, estimators = self._groups_at(est_state, theta, step)
        return wait_if_collectives(grouped_estimate(estimators, est_state, theta, key))

    def estimate_flat(self, est_state, flat_theta, unravel, key: jax.Array, step: int):
        """`estimate` as a gradient worker calls it: θ flat (`unravel` rebuilds it) and the
        worker's key chain `key`, split here. One jitted call when no group switches.

        Returns:
          The flat meta-gradient, the new particles, the window's metrics (`PackedMetrics`:
          one copy to the host) and the next key.
        """
        if not self.switching:
            return wait_if_collectives(
                flat_estimate_step(self.estimator, unravel, est_state, flat_theta, key)
            )
        key, sub = jax.random.split(key)
        theta = jax.jit(unravel)(flat_theta)  # one dispatch, not one per leaf
        grad, est_state, metrics = self.estimate(est_state, theta, sub, step)
        return grad, est_state, pack_metrics(metrics), key

    def abstract_state(self, done: int = 0) -> LearnerState:
        """Shapes, dtypes and placement of the learner state after `done` outer steps
        (restore targets: the groups' templates then decide the particles' shapes)."""
        templates = self.schedule.held_at(done)
        abstract = jax.eval_shape(lambda: self._initial_state(templates))
        return with_shardings(abstract, self._pairs_per_group)

    def place(self, state):
        """The learner state with its pairs sharded across devices (`meta_train.devices`)."""
        return shard_learner_state(state, self._pairs_per_group)

    def outer_step(self, state: LearnerState, step: int) -> tuple[LearnerState, dict]:
        """Outer step number `step` (0-based; `state.step` on the device, passed in so no
        step waits for the device) from `state` (consumed): switches a group's template first
        when the schedule says so, then estimates and applies the meta-gradient."""
        if not self.switching:
            out = fused_outer_step(self.estimator, state, self.outer_opt)
        else:
            est_state, estimators = self._groups_at(state.est_state, state.theta, step)
            out = grouped_outer_step(estimators, state.replace(est_state=est_state), self.outer_opt)
        return wait_if_collectives(out)

    def _groups_at(self, est_state, theta, step: int):
        """(`est_state` with the group the schedule switches at `step` fresh on its new
        template, the groups' one-group estimators at `step`): where the fused step and a
        gradient worker's estimate both start when groups switch."""
        templates = self.schedule.templates_at(step)
        g = self.schedule.switching_group(step)
        if g is not None:
            est_state = self._switch_group(est_state, theta, g, templates[g], step)
        return est_state, [self.group_estimator(t) for t in templates]

    def _switch_group(self, est_state, theta, group: int, template: int, step: int):
        """`est_state` with `group`'s particles fresh on `template`."""
        key = jax.random.fold_in(jax.random.fold_in(self._key(), _SWITCH_STREAM), step)
        fresh = _init_group(self.group_estimator(template), theta, key, jnp.int32(group))
        fresh = jax.device_put(fresh, estimator_shardings(fresh, self._pairs_per_group))
        groups = [est_state.group(g) for g in range(self.config.meta.task_groups)]
        groups[group] = fresh
        return type(fresh).join(groups)

    def compile_counts(self) -> dict[str, int]:
        """Compilations (jit cache entries) of the functions a run calls per step."""
        from meta_train.learner import apply_gradient  # noqa: PLC0415

        return {
            "outer_step": fused_outer_step._cache_size(),
            "estimate_group": estimate_group._cache_size(),
            "init_group": _init_group._cache_size(),
            "apply_gradient": apply_gradient._cache_size(),
        }

    @property
    def _pairs_per_group(self) -> int:
        return self.config.meta.num_pairs // self.config.meta.task_groups

    def held_out_key(self) -> jax.Array:
        return jax.random.fold_in(jax.random.PRNGKey(self.config.run.seed), HELD_OUT_STREAM)


def lopt_problem(
    config: Config, family: TaskFamily, lopt: LearnedOptimizer, template: int
) -> LOptProblem:
    """Training tasks of one template of `family` with `lopt`, as an inner problem."""
    t = family.templates[template]
    return LOptProblem(t.task, lopt, t.sampler, config.meta.loss_clip)


def build_lopt(config: Config) -> LearnedOptimizer:
    kwargs = config.lopt_kwargs()
    return make_lopt(kwargs.pop("kind"), **kwargs)


def build_run(config: Config, family: TaskFamily | None = None) -> Run:
    """Builds a run from a validated config (loads datasets)."""
    family = family or TaskFamily(config.task_family)
    lopt = build_lopt(config)
    m = config.meta
    schedule = TemplateSchedule(
        family.num_templates,
        m.task_groups,
        m.switch_every,
        config.run.seed,
        family.template_probs(),
    )
    problems = tuple(lopt_problem(config, family, lopt, t) for t in schedule.templates_at(0))
    episodes = EpisodeSchedule(m.window, m.min_episode_len, m.max_episode_len)
    estimator = make_estimator(
        m.estimator,
        problems,
        episodes,
        pairs_per_group=m.num_pairs // m.task_groups,
        sigma=m.sigma,
        objective=WindowObjective(m.objective, m.sign_diff, m.diff_clip, m.late_weight),
        stagger=m.stagger,
    )
    outer_opt = outer_optimizer(
        m.outer_lr, m.grad_clip, m.outer_lr_schedule, m.outer_steps, m.outer_lr_final
    )
    return Run(config, family, lopt, estimator, outer_opt, schedule)
