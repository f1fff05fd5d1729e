"""Task families: distributions over tasks of several kinds, sampled from a key.

A family is a list of *templates*, one per shape: a kind ('mlp', 'conv' or 'lm'), an
architecture, a batch shape and a dataset group (datasets of one input shape and class
count share a device array). Shape-changing choices pick a template; each template is
compiled once. Everything else is a traced number drawn by the template's `TaskSampler`
(activation, init scale, which dataset of the group, and the task augmentations), so every
task of one template shares one compilation.

Task augmentation (VeLO, Metz et al. 2022), each switched on by its config key: per-tensor
reparameterisation (`reparam_scale`), loss rescaling (`loss_scale`) and label noise
(`label_noise`); see `tasks.augment`. Augmentations shape what meta-training sees;
`sample_with_info` (held-out evaluation tasks) returns the task without them.

Each template also carries the loss of the uniform predictor, ln(number of classes), which
a freshly initialised network starts near: dividing losses by it puts kinds of different
units (10-way classification, 256-way next-byte prediction) on one scale, where every task
starts near 1.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tasks.augment import LabelNoise, LossScaled, Reparameterised
from tasks.classification import ACTIVATIONS, TaskHParams, mlp_task
from tasks.conv import conv_task
from tasks.datasets import Dataset, load_dataset
from tasks.device_data import to_device

KINDS = ("mlp", "conv", "lm")


@dataclasses.dataclass(frozen=True)
class FamilyConfig:
    """A family of tasks over one or more kinds.

    Attributes:
      kinds: which kinds the family holds: 'mlp' (MLP classifiers), 'conv' (ConvNet image
        classifiers), 'lm' (byte-level language models).
      kind_weights: the probability of each kind (one weight per entry of `kinds`,
        normalised), templates equally likely within a kind; () makes every template equally
        likely.
      activations: activation names, picked per task as a traced number (MLPs, ConvNets and
        the transformer's MLP; recurrent cells keep their own nonlinearities).
      init_scale: (low, high) of a log-uniform multiplier on the default weight init.
      datasets: datasets of the 'mlp' kind (see `tasks.datasets.DATASETS`).
      hidden_sizes: the MLP hidden-layer configurations (each a tuple of widths).
      batch_sizes: MLP training batch sizes.
      conv_datasets: image datasets of the 'conv' kind.
      conv_channels: ConvNet architectures, each a tuple of per-layer channels (2-4 layers).
      conv_strides: per-layer strides, one tuple per entry of `conv_channels` (paired).
      conv_kernel_sizes: square kernel sizes (one per network, all its layers).
      conv_batch_sizes: ConvNet training batch sizes.
      lm_corpora: text corpora of the 'lm' kind (see `tasks.text.load_text`).
      lm_models: 'lstm', 'gru', 'rnn' or 'transformer'.
      lm_hidden: recurrent units or transformer widths.
      lm_layers: recurrent layers or transformer blocks.
      lm_seq_lens: training sequence lengths.
      lm_batch_sizes: training batch sizes (sequences).
      lm_heads: attention heads of transformers.
      reparam_scale: (low, high) of log-uniform per-tensor reparameterisation scales; ()
        switches it off.
      loss_scale: (low, high) of a log-uniform training-loss multiplier; () switches it off.
      label_noise: the fraction of noisy training labels is uniform in [0, label_noise]
        (0 switches it off).
      resolution: resize images to resolution×resolution (0 keeps them as they are).
      grayscale: convert colour images to one channel.
      data_dir: directory holding dataset files ("" uses LOPT_DATA_DIR and the defaults).
      valid_size: fraction of the training split held out for validation (images).
    """

    kinds: tuple[str, ...] = ("mlp",)
    kind_weights: tuple[float, ...] = ()
    activations: tuple[str, ...] = ("relu",)
    init_scale: tuple[float, float] = (1.0, 1.0)
    datasets: tuple[str, ...] = ("mnist1d",)
    hidden_sizes: tuple[tuple[int, ...], ...] = ((32,),)
    batch_sizes: tuple[int, ...] = (128,)
    conv_datasets: tuple[str, ...] = ("fashion_mnist",)
    conv_channels: tuple[tuple[int, ...], ...] = ((16, 32),)
    conv_strides: tuple[tuple[int, ...], ...] = ((2, 2),)
    conv_kernel_sizes: tuple[int, ...] = (3,)
    conv_batch_sizes: tuple[int, ...] = (64,)
    lm_corpora: tuple[str, ...] = ("pydoc",)
    lm_models: tuple[str, ...] = ("lstm",)
    lm_hidden: tuple[int, ...] = (64,)
    lm_layers: tuple[int, ...] = (1,)
    lm_seq_lens: tuple[int, ...] = (64,)
    lm_batch_sizes: tuple[int, ...] = (32,)
    lm_heads: int = 2
    reparam_scale: tuple[float, ...] = ()
    loss_scale: tuple[float, ...] = ()
    label_noise: float = 0.0
    resolution: int = 0
    grayscale: bool = True
    data_dir: str = ""
    valid_size: float = 0.1

    def __post_init__(self):
        for a in self.activations:
            if a not in ACTIVATIONS:
                raise ValueError(f"activations: unknown {a!r}; known {sorted(ACTIVATIONS)}")
        for k in self.kinds:
            if k not in KINDS:
                raise ValueError(f"kinds: unknown {k!r}; known {list(KINDS)}")
        if not self.kinds:
            raise ValueError("kinds must name at least one kind")
        if self.kind_weights and (
            len(self.kind_weights) != len(self.kinds) or min(self.kind_weights) <= 0
        ):
            raise ValueError(
                f"kind_weights needs one weight > 0 per kind {list(self.kinds)}, got "
                f"{list(self.kind_weights)}"
            )
        if not self.datasets or not self.hidden_sizes or not self.batch_sizes:
            raise ValueError("datasets, hidden_sizes and batch_sizes must be non-empty")
        lo, hi = self.init_scale
        if not 0 < lo <= hi:
            raise ValueError(f"init_scale must satisfy 0 < low <= high, got {self.init_scale}")
        if len(self.conv_channels) != len(self.conv_strides) or any(
            len(c) != len(s) for c, s in zip(self.conv_channels, self.conv_strides, strict=False)
        ):
            raise ValueError(
                "conv_strides needs one stride list per conv_channels entry, each with one "
                f"stride per layer; got {self.conv_channels} and {self.conv_strides}"
            )
        for name in ("reparam_scale", "loss_scale"):
            r = getattr(self, name)
            if r and not (len(r) == 2 and 0 < r[0] <= r[1]):
                raise ValueError(f"{name} must be [] (off) or [low, high] with 0 < low <= high")
        if not 0 <= self.label_noise <= 1:
            raise ValueError(f"label_noise must be in [0, 1], got {self.label_noise}")


class TaskDraw(struct.PyTreeNode):
    """The traced numbers of one sampled task: the template's `TaskHParams` and the
    augmentations' numbers (None where the augmentation is off)."""

    hp: TaskHParams
    reparam: jax.Array | None = None  # [num_param_tensors] scales c
    loss_scale: jax.Array | None = None
    label_noise: jax.Array | None = None


def _log_uniform(key: jax.Array, shape: tuple[int, ...], bounds: Sequence[float]) -> jax.Array:
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    return jnp.exp(jax.random.uniform(key, shape, minval=lo, maxval=hi))


@dataclasses.dataclass(frozen=True)
class TaskSampler:
    """Draws a template's traced numbers and builds the (augmented) task from them.

    A value-compared static: equal families share compiles.

    Attributes:
      num_activations: activations `hp.activation` picks from.
      num_datasets: datasets `hp.dataset` picks from.
      init_scale: (low, high), log-uniform.
      num_tensors: parameter tensors of the template (one reparameterisation scale each).
      loss_norm: the loss of the uniform predictor, ln(num_classes) (nats).
      reparam_scale, loss_scale, label_noise: the augmentations (see `FamilyConfig`).
    """

    num_activations: int
    num_datasets: int
    init_scale: tuple[float, float]
    num_tensors: int
    loss_norm: float
    reparam_scale: tuple[float, ...] = ()
    loss_scale: tuple[float, ...] = ()
    label_noise: float = 0.0

    def __call__(self, key: jax.Array) -> TaskDraw:
        k1, k2, k3 = jax.random.split(key, 3)
        # The augmentations draw from their own stream: tasks without them stay as before.
        k4, k5, k6 = jax.random.split(jax.random.fold_in(key, 1), 3)
        hp = TaskHParams(
            activation=jax.random.randint(k1, (), 0, self.num_activations),
            dataset=jax.random.randint(k2, (), 0, self.num_datasets),
            init_scale=_log_uniform(k3, (), self.init_scale),
        )
        return TaskDraw(
            hp,
            reparam=(
                _log_uniform(k4, (self.num_tensors,), self.reparam_scale)
                if self.reparam_scale
                else None
            ),
            loss_scale=_log_uniform(k5, (), self.loss_scale) if self.loss_scale else None,
            label_noise=(
                jax.random.uniform(k6, (), maxval=self.label_noise) if self.label_noise else None
            ),
        )

    def task(self, template: Any, draw: TaskDraw) -> Any:
        """The template with the draw's numbers, wrapped in the drawn augmentations."""
        task = template.replace(hp=draw.hp)
        if draw.label_noise is not None:
            task = LabelNoise(task, draw.label_noise)
        if draw.loss_scale is not None:
            task = LossScaled(task, draw.loss_scale)
        if draw.reparam is not None:
            task = Reparameterised.from_vector(task, draw.reparam)
        return task

    def unscaled(self, draw: TaskDraw, loss: jax.Array) -> jax.Array:
        """A training loss of `task(template, draw)` without the loss-scale augmentation."""
        return loss if draw.loss_scale is None else loss / draw.loss_scale

    def normaliser(self, draw: TaskDraw) -> jax.Array:
        """What the draw's losses are divided by to be comparable across kinds."""
        del draw  # one number per template (the classes do not depend on the draw)
        return jnp.float32(self.loss_norm)


@dataclasses.dataclass(frozen=True)
class Template:
    """One shape of a family.

    Attributes:
      kind: 'mlp', 'conv' or 'lm'.
      task: the task (its data are pytree leaves); numbers are set per draw.
      sampler: draws the traced numbers and builds tasks (static).
      datasets: the dataset names `hp.dataset` picks from.
      shape: a JSON-friendly description of the shape.
    """

    kind: str
    task: Any
    sampler: TaskSampler
    datasets: tuple[str, ...]
    shape: dict

    @property
    def name(self) -> str:
        return f"{self.kind}:" + ",".join(f"{k}={v}" for k, v in self.shape.items())


class TaskFamily:
    """Samples tasks of the configured kinds; see `FamilyConfig`."""

    def __init__(
        self,
        config: FamilyConfig,
        datasets: Sequence[Dataset] | None = None,
        corpora: Sequence[Any] | None = None,
    ):
        """Loads the family's datasets (or takes already loaded ones) onto the device.

        Args:
          config: the family.
          datasets: optional already loaded image/feature datasets, used instead of
            `config.datasets` and `config.conv_datasets` (each kind keeps those of the
            names it lists; with neither listing one, all go to the first image kind).
          corpora: optional already loaded `tasks.text.TextCorpus`es, used instead of
            `config.lm_corpora`.
        """
        self.config = config
        self.templates: list[Template] = []
        given = {d.name: d for d in datasets} if datasets is not None else None
        for kind in config.kinds:
            if kind == "mlp":
                self._add_classifiers("mlp", self._datasets(config.datasets, given))
            elif kind == "conv":
                self._add_classifiers("conv", self._datasets(config.conv_datasets, given))
            else:
                self._add_language_models(corpora)

    # ------------------------------------------------------------------------- building

    def _datasets(self, names: Sequence[str], given: dict | None) -> list[Dataset]:
        c = self.config
        if given is None:
            return [
                load_dataset(
                    n,
                    c.data_dir or None,
                    resolution=c.resolution or None,
                    grayscale=c.grayscale,
                    valid_size=c.valid_size,
                )
                for n in names
            ]
        picked = [given[n] for n in names if n in given]
        return picked or list(given.values())

    def _sampler(self, num_activations: int, num_datasets: int, task: Any) -> TaskSampler:
        c = self.config
        tensors = len(jax.tree.leaves(jax.eval_shape(task.init, jax.random.PRNGKey(0))))
        return TaskSampler(
            num_activations,
            num_datasets,
            tuple(c.init_scale),
            tensors,
            math.log(task.num_classes),
            tuple(c.reparam_scale),
            tuple(c.loss_scale),
            float(c.label_noise),
        )

    def _add_classifiers(self, kind: str, loaded: list[Dataset]) -> None:
        c = self.config
        # Datasets of one input shape and class count share a device array (traced choice).
        groups: dict[tuple, list[Dataset]] = {}
        for ds in loaded:
            key = (ds.splits["train"][0].shape[1:], ds.num_classes)
            groups.setdefault(key, []).append(ds)
        for group in groups.values():
            data = to_device([d.splits for d in group])
            nc = group[0].num_classes
            names = tuple(d.name for d in group)
            if kind == "mlp":
                shapes = [
                    (
                        {"hidden_sizes": list(h), "batch_size": bs},
                        mlp_task(data, h, nc, batch_size=bs, activations=c.activations),
                    )
                    for h, bs in itertools.product(c.hidden_sizes, c.batch_sizes)
                ]
            else:
                if len(data.input_shape) != 3:
                    raise ValueError(
                        f"task_family.conv_datasets: {', '.join(names)} are not images "
                        f"(inputs of shape {data.input_shape}); a ConvNet needs [H, W, C]"
                    )
                shapes = [
                    (
                        {
                            "channels": list(ch),
                            "strides": list(st),
                            "kernel_size": k,
                            "batch_size": bs,
                        },
                        conv_task(
                            data,
                            ch,
                            (k,) * len(ch),
                            st,
                            nc,
                            batch_size=bs,
                            activations=c.activations,
                        ),
                    )
                    for (ch, st), k, bs in itertools.product(
                        zip(c.conv_channels, c.conv_strides, strict=True),
                        c.conv_kernel_sizes,
                        c.conv_batch_sizes,
                    )
                ]
            for shape, task in shapes:
                sampler = self._sampler(len(c.activations), len(group), task)
                self.templates.append(
                    Template(kind, task, sampler, names, {"input": list(data.input_shape), **shape})
                )

    def _add_language_models(self, corpora: Sequence[Any] | None) -> None:
        from tasks.language import lm_task  # noqa: PLC0415
        from tasks.text import load_text  # noqa: PLC0415

        c = self.config
        texts = (
            list(corpora)
            if corpora is not None
            else [load_text(n, c.data_dir or None) for n in c.lm_corpora]
        )
        for corpus in texts:
            for model, hidden, layers, seq, bs in itertools.product(
                c.lm_models, c.lm_hidden, c.lm_layers, c.lm_seq_lens, c.lm_batch_sizes
            ):
                task = lm_task(
                    corpus,
                    model,
                    hidden=hidden,
                    layers=layers,
                    batch_size=bs,
                    seq_len=seq,
                    heads=c.lm_heads,
                    activations=c.activations,
                )
                acts = len(c.activations) if model == "transformer" else 1
                shape = {
                    "model": model,
                    "hidden": hidden,
                    "layers": layers,
                    "seq_len": seq,
                    "batch_size": bs,
                }
                self.templates.append(
                    Template("lm", task, self._sampler(acts, 1, task), (corpus.name,), shape)
                )

    # ------------------------------------------------------------------------- sampling

    @property
    def num_templates(self) -> int:
        return len(self.templates)

    @property
    def kinds(self) -> list[str]:
        return list(dict.fromkeys(t.kind for t in self.templates))

    def template_probs(self) -> tuple[float, ...] | None:
        """Each template's probability under `kind_weights` (None: all equally likely)."""
        weights = dict(zip(self.config.kinds, self.config.kind_weights, strict=False))
        if not weights:
            return None
        counts = {k: sum(t.kind == k for t in self.templates) for k in self.kinds}
        total = sum(weights[k] for k in self.kinds)
        return tuple(weights[t.kind] / total / counts[t.kind] for t in self.templates)

    def sample_template(self, key: jax.Array) -> int:
        """Picks a shape (a template index; kinds weighted by `kind_weights`); a Python int."""
        probs = self.template_probs()
        if probs is None:
            return int(jax.random.randint(key, (), 0, self.num_templates))
        return int(jax.random.choice(key, self.num_templates, p=jnp.asarray(probs)))

    def sampler(self, template: int) -> TaskSampler:
        """The traceable sampler of template `template`'s numbers (compared by value)."""
        return self.templates[template].sampler

    def sample_with_info(self, key: jax.Array, template: int | None = None) -> tuple[Any, dict]:
        """A whole task (shape and numbers, no augmentation), e.g. a held-out evaluation
        task, and a JSON-friendly description of it.

        Args:
          key: draws the template (unless given) and the task's numbers.
          template: the shape to draw numbers for (None: sampled with `sample_template`).
        """
        k1, k2 = jax.random.split(key)
        t = self.sample_template(k1) if template is None else int(template)
        template = self.templates[t]
        hp = template.sampler(k2).hp
        info = {
            "kind": template.kind,
            "template": t,
            "dataset": template.datasets[int(hp.dataset)],
            "init_scale": round(float(hp.init_scale), 4),
            **template.shape,
        }
        if template.kind != "lm" or template.shape["model"] == "transformer":
            info["activation"] = self.config.activations[int(hp.activation)]
        return template.task.replace(hp=hp), info

    def sample(self, key: jax.Array) -> Any:
        """Samples a whole task (shape and numbers)."""
        return self.sample_with_info(key)[0]

    @property
    def dataset_groups(self) -> list[list[str]]:
        """Per template group of datasets sharing a device array (distinct groups)."""
        return [list(g) for g in dict.fromkeys(t.datasets for t in self.templates)]
