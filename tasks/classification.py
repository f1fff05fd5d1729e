"""Image/feature classification tasks over on-device data.

`ClassificationTask` turns any model given as an (init, apply) pair (flax linen, flax nnx
via `nnx.split`, or haiku `transform`) and a `DeviceData` into a `Task`. `MLPTask` is the
flax MLP used by the task families: its activation, init scale and dataset are traced
numbers, so sampling them needs no recompilation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from tasks.base import KeyedFn, accuracy, chunked_sums, cross_entropy, scale_weights
from tasks.device_data import DeviceData

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "swish": jax.nn.swish,
    "elu": jax.nn.elu,
}


def apply_activation(x: jax.Array, index: jax.Array, names: Sequence[str]) -> jax.Array:
    """Applies activation number `index` of `names`; `index` may be traced."""
    if len(names) == 1:
        return ACTIVATIONS[names[0]](x)
    # Under vmap a lax.switch runs every branch anyway; a select over cheap elementwise
    # activations is simpler and equally fast.
    outs = jnp.stack([ACTIVATIONS[n](x) for n in names])
    return outs[index]


class TaskHParams(struct.PyTreeNode):
    """Per-task numbers a family samples; traced, so one compilation serves them all."""

    activation: jax.Array  # int32 index into the family's activation names
    dataset: jax.Array  # int32 index into the datasets concatenated in `DeviceData`
    init_scale: jax.Array  # float32 multiplier on the default (lecun-normal) init

    @classmethod
    def default(cls) -> TaskHParams:
        return cls(jnp.int32(0), jnp.int32(0), jnp.float32(1.0))


class _MLP(nn.Module):
    hidden_sizes: Sequence[int]
    num_classes: int
    activations: Sequence[str]

    @nn.compact
    def __call__(self, x: jax.Array, activation: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for h in self.hidden_sizes:
            x = apply_activation(nn.Dense(h)(x), activation, self.activations)
        return nn.Dense(self.num_classes)(x)


class ClassificationTask(struct.PyTreeNode):
    """Softmax classification of on-device data with a user-given model.

    Attributes:
      data: the dataset(s) on the device (pytree leaves: traced, never constants).
      hp: per-task numbers (activation, dataset index, init scale).
      init_fn: `init_fn(key, x) -> params` (static).
      apply_fn: `apply_fn(params, x, hp) -> logits` (static).
      batch_size: training batch size (static).
      num_classes: number of classes (static).
      eval_batch_size: batch size of `sample_batch` for 'valid'/'test', and the rows per
        chunk of `full_split_metrics` (static).
    """

    data: DeviceData
    hp: TaskHParams
    init_fn: Callable[..., Any] = struct.field(pytree_node=False)
    apply_fn: Callable[..., jax.Array] = struct.field(pytree_node=False)
    batch_size: int = struct.field(pytree_node=False, default=128)
    num_classes: int = struct.field(pytree_node=False, default=10)
    eval_batch_size: int = struct.field(pytree_node=False, default=1000)

    def init(self, key: jax.Array) -> Any:
        return scale_weights(self.init_fn(key, self.data.train.x[:1]), self.hp.init_scale)

    def sample_batch(self, key: jax.Array, split: str = "train"):
        size = self.batch_size if split == "train" else self.eval_batch_size
        return self.data.split(split).sample(key, size, self.hp.dataset)

    def logits(self, params: Any, x: jax.Array) -> jax.Array:
        return self.apply_fn(params, x, self.hp)

    def loss(self, params: Any, batch) -> jax.Array:
        x, y = batch
        return cross_entropy(self.logits(params, x), y)

    def metrics(self, params: Any, batch) -> dict[str, jax.Array]:
        x, y = batch
        logits = self.logits(params, x)
        return {"loss": cross_entropy(logits, y), "accuracy": accuracy(logits, y)}

    def full_split_metrics(self, params: Any, split: str) -> dict[str, jax.Array]:
        """Loss and accuracy over every row of the current dataset in a split.

        Computed `eval_batch_size` rows at a time (`chunked_sums`), so memory stays bounded
        by that chunk however large the split and however many runs are vmapped.

        Args:
          params: the model's parameters.
          split: 'train', 'valid' or 'test'.

        Returns:
          {'loss': mean cross-entropy, 'accuracy': share of correct argmax predictions}.
        """
        s = self.data.split(split)
        first = s.offsets[self.hp.dataset]
        count = s.counts[self.hp.dataset]

        def per_row(batch, rows):
            x, y = batch
            # Splits hold every dataset of the family: count the current one's rows only.
            mask = (rows >= first) & (rows < first + count)
            logits = self.logits(params, x)
            logp = jax.nn.log_softmax(logits)
            nll = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
            correct = jnp.argmax(logits, -1) == y
            return {"nll": jnp.where(mask, nll, 0.0), "correct": correct & mask}

        sums = chunked_sums(per_row, (s.x, s.y), self.eval_batch_size)
        n = jnp.maximum(count, 1)
        return {"loss": sums["nll"] / n, "accuracy": sums["correct"] / n}


def mlp_task(
    data: DeviceData,
    hidden_sizes: Sequence[int],
    num_classes: int,
    *,
    batch_size: int = 128,
    activations: Sequence[str] = ("relu",),
    hp: TaskHParams | None = None,
) -> ClassificationTask:
    """An MLP classifier (flax linen) over `data`.

    Args:
      data: on-device dataset(s); inputs are flattened.
      hidden_sizes: widths of the hidden layers.
      num_classes: output classes.
      batch_size: training batch size.
      activations: names the traced `hp.activation` index chooses from.
      hp: per-task numbers; defaults to activation 0, dataset 0, init scale 1.

    Returns:
      A `ClassificationTask`.
    """
    check_activations(activations)
    module = _MLP(tuple(hidden_sizes), num_classes, tuple(activations))
    return module_task(module, data, num_classes, batch_size=batch_size, hp=hp, name="mlp")


def check_activations(names: Sequence[str]) -> None:
    """Raises ValueError naming an unknown activation."""
    for a in names:
        if a not in ACTIVATIONS:
            raise ValueError(f"unknown activation {a!r}; known: {sorted(ACTIVATIONS)}")


def module_task(
    module: nn.Module,
    data: DeviceData,
    num_classes: int,
    *,
    batch_size: int = 128,
    hp: TaskHParams | None = None,
    name: str = "module",
) -> ClassificationTask:
    """A `ClassificationTask` of a flax module called as `module(x, activation_index)`.

    Tasks built from equal modules compare equal (their functions are keyed by the module),
    so they share compilations.
    """

    def init_fn(key, x):
        return module.init(key, x, jnp.int32(0))["params"]

    def apply_fn(params, x, hp):
        return module.apply({"params": params}, x, hp.activation)

    return ClassificationTask(
        data=data,
        hp=TaskHParams.default() if hp is None else hp,
        init_fn=KeyedFn(init_fn, (f"{name}-init", module)),
        apply_fn=KeyedFn(apply_fn, (f"{name}-apply", module)),
        batch_size=batch_size,
        num_classes=num_classes,
    )


def haiku_task(transformed, data: DeviceData, num_classes: int, *, batch_size: int = 128):
    """Wraps a haiku `hk.transform`ed classifier `f(x) -> logits` as a `ClassificationTask`."""

    def init_fn(key, x):
        return transformed.init(key, x)

    def apply_fn(params, x, hp):
        del hp
        return transformed.apply(params, None, x)

    return ClassificationTask(
        data=data,
        hp=TaskHParams.default(),
        init_fn=KeyedFn(init_fn, ("haiku-init", id(transformed))),
        apply_fn=KeyedFn(apply_fn, ("haiku-apply", id(transformed))),
        batch_size=batch_size,
        num_classes=num_classes,
    )
