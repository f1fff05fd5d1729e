"""Task augmentation in the manner of VeLO (Metz et al. 2022, "VeLO: Training Versatile
Learned Optimizers by Scaling Up"): wrappers that change what an optimizer sees without
changing what is learned, so a learned optimizer cannot rely on one task's scales.

* `Reparameterised`: every parameter tensor p is trained as w = p / c with its own c, so
  gradients reach the optimizer scaled by c per tensor (∂L/∂w = c · ∂L/∂p);
* `LossScaled`: the training loss (and so every gradient) is multiplied by s;
* `LabelNoise`: a fraction of training labels is replaced by uniform random labels.

The numbers (c, s, the noise fraction) are pytree leaves: traced, so sampling them needs no
recompilation. Evaluation metrics (`metrics`, `full_split_metrics`) are those of the
underlying task on the same function, so results stay comparable across augmentations.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


class _Augmented(struct.PyTreeNode):
    """A task seen through an augmentation: everything passes through to `task` unless a
    subclass changes it."""

    task: Any

    def init(self, key: jax.Array) -> Any:
        return self.task.init(key)

    def loss(self, params: Any, batch) -> jax.Array:
        return self.task.loss(params, batch)

    def sample_batch(self, key: jax.Array, split: str = "train"):
        return self.task.sample_batch(key, split)

    def metrics(self, params: Any, batch) -> dict[str, jax.Array]:
        return self.task.metrics(params, batch)

    def full_split_metrics(self, params: Any, split: str) -> dict[str, jax.Array]:
        return self.task.full_split_metrics(params, split)

    @property
    def num_classes(self) -> int:
        return self.task.num_classes


class Reparameterised(_Augmented):
    """Trains w = p / c per tensor; `scales` holds one c per parameter leaf.

    Build with `Reparameterised.sample(task, key, low, high)` for log-uniform scales, or
    `Reparameterised.from_vector(task, scales)` from one scale per tensor.
    """

    scales: Any  # a pytree like the task's params, one scalar per leaf

    @classmethod
    def from_vector(cls, task: Any, scales: jax.Array) -> Reparameterised:
        """One scale per parameter tensor, in `jax.tree.leaves` order of the task's params."""
        treedef = jax.tree.structure(jax.eval_shape(task.init, jax.random.PRNGKey(0)))
        return cls(task, jax.tree.unflatten(treedef, list(scales)))

    @classmethod
    def sample(cls, task: Any, key: jax.Array, low: float, high: float) -> Reparameterised:
        """Scales drawn log-uniformly in [low, high], one per parameter tensor."""
        n = len(jax.tree.leaves(jax.eval_shape(task.init, key)))
        u = jax.random.uniform(key, (n,), minval=jnp.log(low), maxval=jnp.log(high))
        return cls.from_vector(task, jnp.exp(u))

    def to_task_params(self, w: Any) -> Any:
        return jax.tree.map(lambda x, c: x * c, w, self.scales)

    def init(self, key: jax.Array) -> Any:
        return jax.tree.map(lambda p, c: p / c, self.task.init(key), self.scales)

    def loss(self, w: Any, batch) -> jax.Array:
        return self.task.loss(self.to_task_params(w), batch)

    def metrics(self, w: Any, batch) -> dict[str, jax.Array]:
        return self.task.metrics(self.to_task_params(w), batch)

    def full_split_metrics(self, w: Any, split: str) -> dict[str, jax.Array]:
        return self.task.full_split_metrics(self.to_task_params(w), split)


class LossScaled(_Augmented):
    """The training loss times `scale` (reported metrics are unscaled)."""

    scale: jax.Array

    def loss(self, params: Any, batch) -> jax.Array:
        return self.scale * self.task.loss(params, batch)


class LabelNoise(_Augmented):
    """Each training label is replaced, with probability `fraction`, by a uniform random
    label (validation and test batches are untouched)."""

    fraction: jax.Array

    def sample_batch(self, key: jax.Array, split: str = "train"):
        k_batch, k_flip, k_label = jax.random.split(key, 3)
        x, y = self.task.sample_batch(k_batch, split)
        if split != "train":
            return x, y
        flip = jax.random.uniform(k_flip, y.shape) < self.fraction
        noise = jax.random.randint(k_label, y.shape, 0, self.task.num_classes, y.dtype)
        return x, jnp.where(flip, noise, y)
