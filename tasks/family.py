"""Task families: distributions over tasks, sampled from a key.

Numbers (activation, init scale, which dataset among those of equal input shape) are
sampled as traced `TaskHParams`, so every task of one shape shares one compilation.
Shape-changing choices (hidden sizes, batch size, datasets of another input shape) pick
from a small fixed set of templates, each compiled once.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tasks.classification import ACTIVATIONS, ClassificationTask, TaskHParams, mlp_task
from tasks.datasets import Dataset, load_dataset
from tasks.device_data import to_device


@dataclasses.dataclass(frozen=True)
class MLPFamilyConfig:
    """A family of MLP classifiers.

    Attributes:
      datasets: dataset names (see `tasks.datasets.DATASETS`).
      hidden_sizes: the hidden-layer configurations to pick from (each a tuple of widths).
      activations: activation names, picked per task as a traced number.
      batch_sizes: training batch sizes to pick from.
      init_scale: (low, high) of a log-uniform multiplier on the default weight init.
      resolution: resize images to resolution×resolution (None keeps them as they are).
      grayscale: convert colour images to one channel.
      data_dir: directory holding dataset files ("" uses LOPT_DATA_DIR and the defaults).
      valid_size: fraction of the training split held out for validation.
    """

    datasets: tuple[str, ...] = ("mnist1d",)
    hidden_sizes: tuple[tuple[int, ...], ...] = ((32,),)
    activations: tuple[str, ...] = ("relu",)
    batch_sizes: tuple[int, ...] = (128,)
    init_scale: tuple[float, float] = (1.0, 1.0)
    resolution: int = 0
    grayscale: bool = True
    data_dir: str = ""
    valid_size: float = 0.1

    def __post_init__(self):
        for a in self.activations:
            if a not in ACTIVATIONS:
                raise ValueError(f"activations: unknown {a!r}; known {sorted(ACTIVATIONS)}")
        if not self.datasets or not self.hidden_sizes or not self.batch_sizes:
            raise ValueError("datasets, hidden_sizes and batch_sizes must be non-empty")
        lo, hi = self.init_scale
        if not 0 < lo <= hi:
            raise ValueError(f"init_scale must satisfy 0 < low <= high, got {self.init_scale}")


@dataclasses.dataclass(frozen=True)
class HParamSampler:
    """Samples `TaskHParams`; a value-compared static, so equal families share compiles."""

    num_activations: int
    num_datasets: int
    init_scale: tuple[float, float]

    def __call__(self, key: jax.Array) -> TaskHParams:
        k1, k2, k3 = jax.random.split(key, 3)
        lo, hi = np.log(self.init_scale[0]), np.log(self.init_scale[1])
        return TaskHParams(
            activation=jax.random.randint(k1, (), 0, self.num_activations),
            dataset=jax.random.randint(k2, (), 0, self.num_datasets),
            init_scale=jnp.exp(jax.random.uniform(k3, (), minval=lo, maxval=hi)),
        )


class MLPTaskFamily:
    """Samples MLP classification tasks; see `MLPFamilyConfig`."""

    def __init__(self, config: MLPFamilyConfig, datasets: Sequence[Dataset] | None = None):
        """Loads the family's datasets (or takes already loaded ones) onto the device.

        Args:
          config: the family.
          datasets: optional already loaded datasets, used instead of `config.datasets`.
        """
        self.config = config
        loaded = (
            list(datasets)
            if datasets is not None
            else [
                load_dataset(
                    name,
                    config.data_dir or None,
                    resolution=config.resolution or None,
                    grayscale=config.grayscale,
                    valid_size=config.valid_size,
                )
                for name in config.datasets
            ]
        )
        # Datasets of one input shape and class count share a device array (traced choice).
        groups: dict[tuple, list] = {}
        for ds in loaded:
            key = (ds.splits["train"][0].shape[1:], ds.num_classes)
            groups.setdefault(key, []).append(ds)
        self.dataset_groups = [[d.name for d in g] for g in groups.values()]
        datas = [(to_device([d.splits for d in g]), g[0].num_classes) for g in groups.values()]
        self.templates: list[ClassificationTask] = []
        self._template_shapes: list[tuple[list[str], tuple[int, ...]]] = []
        for (data, nc), names in zip(datas, self.dataset_groups, strict=True):
            for hidden, bs in itertools.product(config.hidden_sizes, config.batch_sizes):
                task = mlp_task(data, hidden, nc, batch_size=bs, activations=config.activations)
                self.templates.append(task)
                self._template_shapes.append((names, tuple(hidden)))

    @property
    def num_templates(self) -> int:
        return len(self.templates)

    def sample_template(self, key: jax.Array) -> int:
        """Picks a shape (a template index) from a key; a Python int."""
        return int(jax.random.randint(key, (), 0, self.num_templates))

    def hparam_sampler(self, template: int) -> HParamSampler:
        """The traceable sampler of template `template`'s numbers (compared by value)."""
        return HParamSampler(
            len(self.config.activations),
            len(self._template_shapes[template][0]),
            self.config.init_scale,
        )

    def sample_hparams(self, key: jax.Array, template: int) -> TaskHParams:
        """Samples the traced numbers of a task of template `template` (jit/vmap-safe)."""
        return self.hparam_sampler(template)(key)

    def sample(self, key: jax.Array) -> ClassificationTask:
        """Samples a whole task (shape and numbers), e.g. a held-out evaluation task."""
        return self.sample_with_info(key)[0]

    def sample_with_info(self, key: jax.Array) -> tuple[ClassificationTask, dict]:
        """Like `sample`, also returning a JSON-friendly description of the task."""
        k1, k2 = jax.random.split(key)
        t = self.sample_template(k1)
        hp = self.sample_hparams(k2, t)
        names, hidden = self._template_shapes[t]
        info = {
            "template": t,
            "dataset": names[int(hp.dataset)],
            "activation": self.config.activations[int(hp.activation)],
            "init_scale": round(float(hp.init_scale), 4),
            "batch_size": self.templates[t].batch_size,
            "hidden_sizes": list(hidden),
        }
        return self.templates[t].replace(hp=hp), info
