"""Datasets resident on the device, and batch sampling with `jax.random` inside jit.

Several datasets of the same input shape are concatenated into one array per split with
per-dataset offsets and counts, so "which dataset" is a traced integer: a task family can
switch datasets between sampled tasks without recompiling.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


class SplitArrays(struct.PyTreeNode):
    """One split of one or more datasets, concatenated along the first axis."""

    x: jax.Array  # [N_total, ...] float32
    y: jax.Array  # [N_total] int32
    offsets: jax.Array  # [num_datasets] int32: first row of each dataset
    counts: jax.Array  # [num_datasets] int32: rows of each dataset

    def sample(self, key: jax.Array, batch_size: int, dataset: jax.Array | int = 0):
        """Samples `batch_size` rows (with replacement) of dataset number `dataset`.

        Rows are 32 random bits modulo the row count: one random draw per batch where
        `jax.random.randint` makes three (each a loop in the compiled step on the CPU), at a
        bias below count / 2^32 (1.4e-5 for 60,000 rows).
        """
        bits = jax.random.bits(key, (batch_size,), jnp.uint32)
        idx = (bits % self.counts[dataset].astype(jnp.uint32)).astype(jnp.int32)
        idx = idx + self.offsets[dataset]
        return self.x[idx], self.y[idx]


class DeviceData(struct.PyTreeNode):
    """Train, validation and test splits on the device."""

    train: SplitArrays
    valid: SplitArrays
    test: SplitArrays

    def split(self, name: str) -> SplitArrays:
        if name not in ("train", "valid", "test"):
            raise ValueError(f"unknown split {name!r}; expected 'train', 'valid' or 'test'")
        return getattr(self, name)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def _concat(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> SplitArrays:
    counts = np.array([len(y) for _, y in parts], np.int32)
    if (counts == 0).any():
        raise ValueError("a dataset split is empty")
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    x = np.concatenate([np.asarray(x, np.float32) for x, _ in parts])
    y = np.concatenate([np.asarray(y, np.int32) for _, y in parts])
    return SplitArrays(jnp.asarray(x), jnp.asarray(y), jnp.asarray(offsets), jnp.asarray(counts))


def to_device(
    splits: Sequence[dict[str, tuple[np.ndarray, np.ndarray]]],
) -> DeviceData:
    """Puts one or more datasets, each {'train'|'valid'|'test': (x, y)}, on the device."""
    shapes = {tuple(np.shape(s["train"][0])[1:]) for s in splits}
    if len(shapes) != 1:
        raise ValueError(f"datasets on one device array must share an input shape, got {shapes}")
    return DeviceData(**{k: _concat([s[k] for s in splits]) for k in ("train", "valid", "test")})
