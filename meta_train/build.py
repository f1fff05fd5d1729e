"""Builds a run's pieces (task family, learned optimizer, estimator, learner) from a config."""

from __future__ import annotations

import dataclasses
import math

import jax

from lopt.base import LearnedOptimizer
from lopt.registry import make_lopt
from meta_train.config import Config
from meta_train.devices import shard_learner_state, with_shardings
from meta_train.estimators import WindowObjective, make_estimator
from meta_train.learner import init_learner, outer_optimizer
from meta_train.lopt_problem import LOptProblem
from meta_train.unroll import EpisodeSchedule
from tasks.family import MLPTaskFamily

# Independent random streams of a run: tasks seen in meta-training never reuse the keys of
# the held-out evaluation tasks.
TRAIN_STREAM, HELD_OUT_STREAM = 0, 1


@dataclasses.dataclass
class Run:
    """The pieces of a meta-training run."""

    config: Config
    family: MLPTaskFamily
    lopt: LearnedOptimizer
    estimator: object
    outer_opt: object
    templates: list[int]

    def init_state(self):
        """The initial learner state, particles sharded across devices."""
        return self.place(self._initial_state())

    def _initial_state(self):
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.run.seed), TRAIN_STREAM)
        k_theta, k_learner = jax.random.split(key)
        theta = self.lopt.init_meta(k_theta)
        return init_learner(self.estimator, theta, self.outer_opt, k_learner)

    def abstract_state(self):
        """Shapes, dtypes and placement of the learner state (restore targets)."""
        return with_shardings(jax.eval_shape(self._initial_state), self._pairs_per_group)

    def place(self, state):
        """The learner state with its pairs sharded across devices (`meta_train.devices`)."""
        return shard_learner_state(state, self._pairs_per_group)

    @property
    def _pairs_per_group(self) -> int:
        return self.config.meta.num_pairs // self.config.meta.task_groups

    def held_out_key(self) -> jax.Array:
        return jax.random.fold_in(jax.random.PRNGKey(self.config.run.seed), HELD_OUT_STREAM)


def build_lopt(config: Config) -> LearnedOptimizer:
    kwargs = config.lopt_kwargs()
    return make_lopt(kwargs.pop("kind"), **kwargs)


def build_run(config: Config, family: MLPTaskFamily | None = None) -> Run:
    """Builds a run from a validated config (loads datasets)."""
    family = family or MLPTaskFamily(config.task_family)
    lopt = build_lopt(config)
    m = config.meta
    key = jax.random.fold_in(jax.random.PRNGKey(config.run.seed), TRAIN_STREAM)
    templates = [
        family.sample_template(jax.random.fold_in(key, 1000 + g)) for g in range(m.task_groups)
    ]
    problems = tuple(
        LOptProblem(
            family.templates[t],
            lopt,
            family.hparam_sampler(t),
            m.loss_clip * math.log(family.templates[t].num_classes),
        )
        for t in templates
    )
    schedule = EpisodeSchedule(m.window, m.min_episode_len, m.max_episode_len)
    estimator = make_estimator(
        m.estimator,
        problems,
        schedule,
        pairs_per_group=m.num_pairs // m.task_groups,
        sigma=m.sigma,
        objective=WindowObjective(m.objective, m.sign_diff, m.diff_clip),
        stagger=m.stagger,
    )
    return Run(config, family, lopt, estimator, outer_optimizer(m.outer_lr, m.grad_clip), templates)
