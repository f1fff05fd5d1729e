"""The task interface: pure functions over pytrees, data resident on the device.

A task is a `flax.struct` pytree. Its array fields (the dataset, and the per-sample numbers
of a task family such as the activation index or the init scale) are pytree leaves, so a
task passes through `jax.jit` as an argument: the data is never baked into the compiled
program as a constant and one compilation serves every task of the same shapes. Shapes
(widths, batch size) are static fields.

`tasks` knows nothing about learned optimizers or estimators.
"""

from __future__ import annotations

from collections.abc import Callable
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


def scale_weights(params: Any, scale: jax.Array) -> Any:
    """`params` with every weight matrix (ndim > 1) times `scale`: a family's init scale.
    Biases and norms (vectors) keep their init."""
    return jax.tree.map(lambda p: p * scale if p.ndim > 1 else p, params)


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


def chunked_sums(
    fn: Callable[[Any, jax.Array], dict[str, jax.Array]], xs: Any, chunk: int
) -> dict[str, jax.Array]:
    """Sums per-row values of `fn` over every row of `xs`, `chunk` rows at a time.

    Peak memory is that of `fn` on `chunk` rows, whatever the number of rows: a full-split
    evaluation vmapped over many runs stays bounded. Rows are read with `dynamic_slice`
    (no padded copy of the data); the last chunk is shifted back to end at the last row,
    and rows an earlier chunk already counted are masked out. Traceable (jit, vmap) and,
    being a `lax.map` (a scan) of fixed length, reverse-differentiable.

    Args:
      fn: `fn(batch, rows) -> {name: values}` where `batch` is `xs` restricted to `chunk`
        rows, `rows` [chunk] their int32 indices in `xs`, and each value has the leading
        axis [chunk] (trailing axes are summed too).
      xs: a pytree of arrays sharing a leading axis of N >= 1 rows.
      chunk: rows per call of `fn` (static; clipped to N).

    Returns:
      {name: sum over the N rows (and trailing axes)}; booleans are summed as int32.

    Raises:
      ValueError: `xs` has no rows, or `chunk` < 1.
    """
    n = jax.tree.leaves(xs)[0].shape[0]
    if n < 1 or chunk < 1:
        raise ValueError(f"chunked_sums needs rows and a chunk >= 1, got {n} rows, chunk {chunk}")
    chunk = min(chunk, n)
    num_chunks = -(-n // chunk)

    def one(i):
        # The last chunk starts at n - chunk: rows below i * chunk were counted before.
        start = jnp.minimum(i * chunk, n - chunk)
        batch = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk), xs)
        rows = start + jnp.arange(chunk, dtype=jnp.int32)
        keep = rows >= i * chunk  # the others were counted by the previous chunk
        out = {}
        for name, v in fn(batch, rows).items():
            v = v.astype(jnp.int32) if v.dtype == jnp.bool_ else v
            mask = keep.reshape(keep.shape + (1,) * (v.ndim - 1))
            out[name] = jnp.sum(jnp.where(mask, v, jnp.zeros_like(v)))
        return out

    sums = jax.lax.map(one, jnp.arange(num_chunks, dtype=jnp.int32))
    return jax.tree.map(lambda s: jnp.sum(s, axis=0), sums)
