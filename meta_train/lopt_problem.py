"""Training a task with a learned optimizer, as an inner problem for `meta_train.unroll`.

The problem is a pytree (the task template's data are leaves), so it enters jit as an
argument: sampled tasks of one shape share one compilation.

Meta-losses are normalised: a task's loss divided by the loss of the uniform predictor,
ln(number of classes) (`tasks.family.TaskSampler.normaliser`), so every task starts near
1.0 whatever its kind (10-way classification or 256-way next-byte prediction) and groups of
different kinds enter one meta-gradient on one scale.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lopt.base import LearnedOptimizer
from meta_train.unroll import all_finite
from tasks.family import TaskDraw, TaskSampler


class LOptInner(struct.PyTreeNode):
    """Inner state of one learned-optimizer training run."""

    draw: TaskDraw
    params: Any
    opt_state: Any


class LOptProblem(struct.PyTreeNode):
    """Meta-loss: the normalised, clipped training loss of a task trained by `lopt(theta)`.

    Attributes:
      task: a task template; `reset` draws its traced numbers (and augmentations).
      lopt: the learned optimizer (static).
      sampler: the template's `TaskSampler` (static, traceable).
      loss_clip: normalised losses are clipped at this value and NaN/inf maps to it,
        following practice for ES on learned optimizers (1.5: half again the loss of the
        uniform predictor).
    """

    task: Any
    lopt: LearnedOptimizer = struct.field(pytree_node=False)
    sampler: TaskSampler = struct.field(pytree_node=False)
    loss_clip: float = struct.field(pytree_node=False, default=1.5)

    def reset(self, theta: Any, key: jax.Array, num_steps: jax.Array) -> LOptInner:
        k_task, k_init = jax.random.split(key)
        draw = self.sampler(k_task)
        params = self.sampler.task(self.task, draw).init(k_init)
        return LOptInner(draw, params, self.lopt.optimizer(theta).init(params, num_steps))

    def step(self, theta: Any, inner: LOptInner, key: jax.Array):
        task = self.sampler.task(self.task, inner.draw)
        loss, grads = jax.value_and_grad(task.loss)(inner.params, task.sample_batch(key))
        # The optimizer sees the (augmented) training loss; the meta-loss is the task's own.
        updates, opt_state = self.lopt.optimizer(theta).update(
            grads, inner.opt_state, inner.params, loss
        )
        params = optax.apply_updates(inner.params, updates)
        finite = jnp.isfinite(loss) & all_finite(params)
        meta = self._normalised(self.sampler.unscaled(inner.draw, loss), inner.draw)
        return LOptInner(inner.draw, params, opt_state), meta, finite

    def eval_loss(self, theta: Any, inner: LOptInner, key: jax.Array) -> jax.Array:
        """The normalised, clipped loss of a validation batch (clean labels, unscaled): for
        end-of-window validation objectives."""
        del theta
        task = self.sampler.task(self.task, inner.draw)
        loss = task.metrics(inner.params, task.sample_batch(key, "valid"))["loss"]
        return self._normalised(loss, inner.draw)

    def _normalised(self, loss: jax.Array, draw: TaskDraw) -> jax.Array:
        loss = loss / self.sampler.normaliser(draw)
        return jnp.minimum(jnp.nan_to_num(loss, nan=self.loss_clip), self.loss_clip)
