"""`tasks.epochs.steps_per_epoch`: training steps per pass over a task's training data."""

import jax.numpy as jnp
import numpy as np
import pytest

from tasks.augment import LossScaled
from tasks.classification import TaskHParams, mlp_task
from tasks.device_data import to_device
from tasks.epochs import steps_per_epoch
from tasks.language import lm_task
from tasks.text import TextCorpus


def _split(n):
    rng = np.random.default_rng(n)
    return rng.normal(size=(n, 5)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)


def test_classification_is_its_datasets_training_examples_over_the_batch():
    # two datasets on the device: the task's dataset index picks whose examples count
    data = to_device(
        [
            {s: _split(n) for s, n in (("train", 300), ("valid", 20), ("test", 20))},
            {s: _split(n) for s, n in (("train", 1000), ("valid", 20), ("test", 20))},
        ]
    )
    first = mlp_task(data, [8], 3, batch_size=64)
    assert steps_per_epoch(first) == pytest.approx(300 / 64)
    second = first.replace(hp=TaskHParams(jnp.int32(0), jnp.int32(1), jnp.float32(1.0)))
    assert steps_per_epoch(second) == pytest.approx(1000 / 64)
    # an augmented task counts as the task it wraps
    assert steps_per_epoch(LossScaled(second, jnp.float32(3.0))) == pytest.approx(1000 / 64)


def test_a_language_model_is_its_training_bytes_over_batch_times_sequence():
    text = np.frombuffer(b"abcdefgh" * 2000, np.uint8)
    corpus = TextCorpus(
        "t", {"train": text[:12000], "valid": text[12000:14000], "test": text[14000:]}, "test"
    )
    task = lm_task(corpus, "lstm", hidden=8, batch_size=4, seq_len=16)
    assert steps_per_epoch(task) == pytest.approx(12000 / (4 * 16))


def test_a_task_of_another_kind_has_none():
    class UserTask:  # a user's own task: the optimizer cannot know its data
        pass

    assert steps_per_epoch(UserTask()) is None
    assert steps_per_epoch(LossScaled(UserTask(), jnp.float32(1.0))) is None
