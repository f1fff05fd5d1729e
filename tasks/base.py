"""The task interface: pure functions over pytrees, data resident on the device.

A task is a `flax.struct` pytree. Its array fields (the dataset, and the per-sample numbers
of a task family such as the activation index or the init scale) are pytree leaves, so a
task passes through `jax.jit` as an argument: the data is never baked into the compiled
program as a constant and one compilation serves every task of the same shapes. Shapes
(widths, batch size) are static fields.

`tasks` knows nothing about learned optimizers or estimators.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

Params = Any
Batch = Any
PRNGKey = jax.Array


@runtime_checkable
class Task(Protocol):
    """What meta-training, evaluation and users' loops need from an inner problem.

    Every method is pure and traceable: call them inside `jit`, `vmap` and `lax.scan`.
    """

    num_classes: int

    def init(self, key: PRNGKey) -> Params:
        """Returns freshly initialised parameters."""

    def loss(self, params: Params, batch: Batch) -> jax.Array:
        """Returns the scalar training loss of `params` on `batch`."""

    def sample_batch(self, key: PRNGKey, split: str = "train") -> Batch:
        """Samples a batch of the split ('train', 'valid' or 'test') with `jax.random`."""

    def metrics(self, params: Params, batch: Batch) -> dict[str, jax.Array]:
        """Returns {'loss': ..., 'accuracy': ...} of `params` on `batch`."""


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer labels."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


class KeyedFn:
    """A callable compared and hashed by a key (e.g. its flax module): tasks of equal shapes
    built separately are equal static arguments, so they share one compilation."""

    def __init__(self, fn, key):
        self.fn, self.key = fn, key

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __eq__(self, other):
        return isinstance(other, KeyedFn) and self.key == other.key

    def __hash__(self):
        return hash(self.key)
