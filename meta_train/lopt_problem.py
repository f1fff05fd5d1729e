"""Training a task with a learned optimizer, as an inner problem for `meta_train.unroll`.

The problem is a pytree (the task template's data are leaves), so it enters jit as an
argument: sampled tasks of one shape share one compilation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lopt.base import LearnedOptimizer
from meta_train.unroll import all_finite
from tasks.classification import ClassificationTask, TaskHParams


class LOptInner(struct.PyTreeNode):
    """Inner state of one learned-optimizer training run."""

    hp: TaskHParams
    params: Any
    opt_state: Any


class LOptProblem(struct.PyTreeNode):
    """Meta-loss: the (clipped) training loss of a task trained by `lopt(theta)`.

    Attributes:
      task: a task template; `reset` samples its traced numbers with `sample_hparams`.
      lopt: the learned optimizer (static).
      sample_hparams: `key -> TaskHParams` (static, traceable).
      loss_clip: task losses are clipped at this value and NaN/inf maps to it, following
        practice for ES on learned optimizers (1.5 · ln(num_classes)).
    """

    task: ClassificationTask
    lopt: LearnedOptimizer = struct.field(pytree_node=False)
    sample_hparams: Callable[[jax.Array], TaskHParams] = struct.field(pytree_node=False)
    loss_clip: float = struct.field(pytree_node=False, default=3.45)

    def reset(self, theta: Any, key: jax.Array, num_steps: jax.Array) -> LOptInner:
        k_task, k_init = jax.random.split(key)
        hp = self.sample_hparams(k_task)
        params = self.task.replace(hp=hp).init(k_init)
        return LOptInner(hp, params, self.lopt.optimizer(theta).init(params, num_steps))

    def step(self, theta: Any, inner: LOptInner, key: jax.Array):
        task = self.task.replace(hp=inner.hp)
        loss, grads = jax.value_and_grad(task.loss)(inner.params, task.sample_batch(key))
        updates, opt_state = self.lopt.optimizer(theta).update(
            grads, inner.opt_state, inner.params, loss
        )
        params = optax.apply_updates(inner.params, updates)
        finite = jnp.isfinite(loss) & all_finite(params)
        return LOptInner(inner.hp, params, opt_state), self._clip(loss), finite

    def eval_loss(self, theta: Any, inner: LOptInner, key: jax.Array) -> jax.Array:
        """The (clipped) loss of a validation batch: for end-of-window validation objectives."""
        del theta
        task = self.task.replace(hp=inner.hp)
        return self._clip(task.loss(inner.params, task.sample_batch(key, "valid")))

    def _clip(self, loss: jax.Array) -> jax.Array:
        return jnp.minimum(jnp.nan_to_num(loss, nan=self.loss_clip), self.loss_clip)
