"""Small generated data of every task kind (no files, no network) for tests of families
that mix MLPs, ConvNets and language models."""

import numpy as np

from tasks.datasets import Dataset
from tasks.family import TaskFamily
from tasks.text import TextCorpus, split_blocks


def blobs(n: int, d: int, classes: int = 3, seed: int = 0):
    """Gaussian clusters: [n, d] float32 inputs and int32 labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n).astype(np.int32)
    centers = rng.standard_normal((classes, d)) * 3
    return (centers[y] + rng.standard_normal((n, d))).astype(np.float32), y


def images(n: int, seed: int = 0, hw: int = 8):
    """Gaussian clusters shaped as one-channel images [n, hw, hw, 1]."""
    x, y = blobs(n, hw * hw, seed=seed)
    return x.reshape(n, hw, hw, 1), y


def dataset(name: str, make, n: int = 200) -> Dataset:
    return Dataset(
        name, {"train": make(n, 0), "valid": make(40, 1), "test": make(40, 2)}, 3, "test"
    )


def corpus() -> TextCorpus:
    text = b"the quick brown fox jumps over the lazy dog. " * 60
    return TextCorpus("tiny", split_blocks(np.frombuffer(text, np.uint8)), "test")


def mixed_family(config) -> TaskFamily:
    """`config.task_family` over generated data: 'mnist1d' is 12-feature vectors,
    'fashion_mnist' 8x8 images, the corpus a repeated sentence."""
    vectors = dataset("mnist1d", lambda n, s: blobs(n, 12, seed=s))
    imgs = dataset("fashion_mnist", lambda n, s: images(n, seed=s))
    return TaskFamily(config.task_family, [vectors, imgs], [corpus()])
