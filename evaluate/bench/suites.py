"""Named task suites of the optimizer benchmark (`python -m evaluate.bench --suite NAME`).

A `BenchTask` is a plain, hashable description of one training problem at one horizon
(`mlp-fashion_mnist@1000`); `build_task` turns it into a task of `tasks/`. Descriptions,
not task objects, travel to worker processes and into cache keys.

Suites:

- `quick`: two small tasks, small grids; about 2 minutes on a 2-core CPU with nothing
  cached. CI runs it.
- `classic`: fixed tasks people know, sized for a CPU: MLPs on MNIST, Fashion-MNIST and
  MNIST-1D, ConvNets on Fashion-MNIST and CIFAR-10, byte-level LSTM and transformer LMs;
  the MLPs at two horizons (1,000 and 5,000 steps), since learned optimizers are sensitive
  to the horizon they meet.
- `in_family`: the held-out tasks of a meta-training config's family (the same tasks
  `python -m evaluate` uses), at that config's evaluation horizon.

A TOML file can define a suite too (see `load_suite_file`).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

from evaluate.bench.baselines import DEFAULT_BASELINES, QUICK_BASELINES, Baseline
from meta_train.cli import UserError

KINDS = ("mlp", "conv", "lm", "family")


class SuiteError(UserError):
    """An unknown suite, or a suite file or option that does not describe one."""


@dataclasses.dataclass(frozen=True)
class BenchTask:
    """One benchmark problem: a model, its data and a horizon.

    Attributes:
      name: unique in its suite, e.g. 'mlp-fashion_mnist@1000'.
      kind: 'mlp', 'conv', 'lm' or 'family' (a held-out task of a meta-training family).
      steps: training steps (the horizon).
      options: the builder's options as sorted (key, value) pairs; values are JSON data.
      description: one line for tables and plots.
    """

    name: str
    kind: str
    steps: int
    options: tuple[tuple[str, Any], ...]
    description: str = ""

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    def at(self, steps: int) -> BenchTask:
        """The same problem at another horizon (the name's '@N' follows)."""
        base = self.name.rsplit("@", 1)[0]
        return dataclasses.replace(self, name=f"{base}@{steps}", steps=int(steps))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "steps": self.steps,
            "options": dict(self.options),
            "description": self.description,
        }


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        if all(isinstance(v[0], str) for v in value) and value:
            return {k: _thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def bench_task(name: str, kind: str, steps: int, description: str = "", **options: Any):
    """A `BenchTask` with `options` frozen into a hashable form."""
    if kind not in KINDS:
        raise SuiteError(f"task {name!r}: unknown kind {kind!r}; known: {', '.join(KINDS)}")
    if int(steps) < 1:
        raise SuiteError(f"task {name!r}: steps must be >= 1, got {steps}")
    frozen = tuple(sorted((k, _freeze(v)) for k, v in options.items()))
    return BenchTask(name, kind, int(steps), frozen, description)


@dataclasses.dataclass(frozen=True)
class Suite:
    """A named set of tasks with the settings every optimizer is measured under.

    Attributes:
      name: the suite's name.
      tasks: the problems.
      seeds: seeds per optimizer and task (common random numbers across optimizers).
      eval_points: full-split validation evaluations per run (plus the initial one).
      train_bins: the training-loss curve is the minibatch loss averaged over this many bins.
      baselines: the tuned baselines, each with its learning-rate grid.
    """

    name: str
    tasks: tuple[BenchTask, ...]
    seeds: int = 3
    eval_points: int = 20
    train_bins: int = 100
    baselines: tuple[Baseline, ...] = DEFAULT_BASELINES

    def with_overrides(self, steps: int | None = None, seeds: int | None = None) -> Suite:
        """The suite with every horizon set to `steps` and/or `seeds` seeds."""
        s = self
        if steps is not None:
            tasks = list(dict.fromkeys(t.at(steps) for t in s.tasks))  # equal tasks merge
            s = dataclasses.replace(s, tasks=tuple(tasks))
        if seeds is not None:
            s = dataclasses.replace(s, seeds=int(seeds))
        return s


# --------------------------------------------------------------------------- the suites

_MLP = {"hidden_sizes": [128, 128], "batch_size": 128, "activation": "relu"}
_CONV = {"channels": [16, 32], "kernel_sizes": [3, 3], "strides": [2, 2], "batch_size": 128}
_LM = {"corpus": "pydoc", "batch_size": 16, "seq_len": 64}


def _mlp(dataset: str, steps: int, label: str) -> BenchTask:
    return bench_task(
        f"mlp-{dataset}@{steps}",
        "mlp",
        steps,
        f"MLP 128-128 relu, batch 128, {label}",
        dataset=dataset,
        **_MLP,
    )


def _conv(dataset: str, steps: int, label: str) -> BenchTask:
    return bench_task(
        f"conv-{dataset}@{steps}",
        "conv",
        steps,
        f"ConvNet 16-32 (3x3, stride 2), mean pool, batch 128, {label}",
        dataset=dataset,
        grayscale=False,
        **_CONV,
    )


def classic_tasks() -> tuple[BenchTask, ...]:
    """The `classic` suite's tasks (sized so that its baselines run in ~15 minutes on
    2 CPU cores)."""
    return (
        _mlp("mnist", 1000, "MNIST 28x28"),
        _mlp("fashion_mnist", 1000, "Fashion-MNIST 28x28"),
        _mlp("fashion_mnist", 5000, "Fashion-MNIST 28x28"),
        _mlp("mnist1d", 1000, "MNIST-1D (40 features)"),
        _mlp("mnist1d", 5000, "MNIST-1D (40 features)"),
        _conv("fashion_mnist", 1000, "Fashion-MNIST 28x28"),
        _conv("cifar10", 1000, "CIFAR-10 32x32x3"),
        bench_task(
            "lstm-pydoc@1000",
            "lm",
            1000,
            "byte-level LSTM, 1 layer of 64, batch 16 x 64 bytes, Python docs (pydoc)",
            model="lstm",
            hidden=64,
            layers=1,
            **_LM,
        ),
        bench_task(
            "transformer-pydoc@1000",
            "lm",
            1000,
            "byte-level transformer, 2 blocks of width 32, 2 heads, batch 16 x 64 bytes, pydoc",
            model="transformer",
            hidden=32,
            layers=2,
            heads=2,
            **_LM,
        ),
    )


def quick_tasks() -> tuple[BenchTask, ...]:
    """The `quick` suite's tasks: small and offline, for CI and smoke tests."""
    return (
        bench_task(
            "mlp-mnist1d@300",
            "mlp",
            300,
            "MLP 32-32 relu, batch 64, MNIST-1D",
            dataset="mnist1d",
            hidden_sizes=[32, 32],
            batch_size=64,
            activation="relu",
        ),
        bench_task(
            "lstm-pydoc@200",
            "lm",
            200,
            "byte-level LSTM, 1 layer of 32, batch 8 x 32 bytes, pydoc",
            model="lstm",
            hidden=32,
            layers=1,
            corpus="pydoc",
            batch_size=8,
            seq_len=32,
        ),
    )


def family_tasks(config: Any, steps: int | None = None) -> tuple[BenchTask, ...]:
    """The held-out tasks of a meta-training config's family, as `python -m evaluate` uses.

    Args:
      config: a `meta_train.config.Config`.
      steps: horizon; default the config's `eval.num_steps`, else `meta.max_episode_len`.

    Returns:
      `config.eval.num_tasks` tasks named 'heldout-I@STEPS'.
    """
    horizon = int(steps or config.eval.num_steps or config.meta.max_episode_len)
    family = dataclasses.asdict(config.task_family)
    n = int(config.eval.num_tasks)
    return tuple(
        bench_task(
            f"heldout-{i}@{horizon}",
            "family",
            horizon,
            f"held-out task {i} of {n} of the family (run.seed={config.run.seed})",
            family=family,
            seed=int(config.run.seed),
            index=i,
            num_tasks=n,
        )
        for i in range(n)
    )


SUITES = ("quick", "classic", "in_family")


def get_suite(name: str, family_config: Any = None) -> Suite:
    """The suite called `name`, or the suite defined in the TOML file `name`.

    Args:
      name: 'quick', 'classic', 'in_family' or a path to a suite file.
      family_config: for 'in_family', the `meta_train.config.Config` whose family to use.

    Raises:
      SuiteError: an unknown name (listing the known ones), or a bad suite file.
    """
    if name == "quick":
        return Suite("quick", quick_tasks(), baselines=QUICK_BASELINES, eval_points=10)
    if name == "classic":
        return Suite("classic", classic_tasks())
    if name == "in_family":
        if family_config is None:
            raise SuiteError(
                "suite 'in_family' needs a family: pass --config RUN_CONFIG.toml, or an "
                "--optimizer that is a meta-training checkpoint (its config is used)"
            )
        return Suite("in_family", family_tasks(family_config))
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        return load_suite_file(path)
    raise SuiteError(f"unknown suite {name!r}; known: {', '.join(SUITES)}, or a suite file (.toml)")


def load_suite_file(path: str | Path) -> Suite:
    """Reads a suite from TOML:

        name = "mine"          # optional; default the file's stem
        seeds = 3              # optional
        eval_points = 20       # optional
        baselines = "quick"    # optional: "default" or "quick" (their grids)
        [[task]]
        name = "mlp-mnist1d@500"
        kind = "mlp"           # mlp | conv | lm
        steps = 500
        dataset = "mnist1d"    # every other key is an option of the kind's builder
        hidden_sizes = [32]

    Raises:
      SuiteError: unreadable TOML, missing or unknown keys, duplicate task names.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SuiteError(f"suite file {path}: {e}") from e
    known = {"name", "seeds", "eval_points", "train_bins", "baselines", "task"}
    unknown = set(data) - known
    if unknown:
        raise SuiteError(
            f"suite file {path}: unknown keys {sorted(unknown)}; known {sorted(known)}"
        )
    tasks = []
    for i, t in enumerate(data.get("task", [])):
        t = dict(t)
        missing = {"name", "kind", "steps"} - set(t)
        if missing:
            raise SuiteError(f"suite file {path}: task {i} lacks {sorted(missing)}")
        name, kind, steps = t.pop("name"), t.pop("kind"), t.pop("steps")
        if kind == "family":
            raise SuiteError(
                f"suite file {path}: task {name!r}: use --suite in_family for family tasks"
            )
        desc = t.pop("description", "")
        tasks.append(bench_task(name, kind, steps, desc, **t))
    if not tasks:
        raise SuiteError(f"suite file {path}: no [[task]] entries")
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SuiteError(f"suite file {path}: duplicate task names {dupes}")
    grids = {"default": DEFAULT_BASELINES, "quick": QUICK_BASELINES}
    which = data.get("baselines", "default")
    if which not in grids:
        raise SuiteError(f"suite file {path}: baselines must be one of {sorted(grids)}")
    suite = Suite(
        data.get("name", path.stem),
        tuple(tasks),
        seeds=int(data.get("seeds", 3)),
        eval_points=int(data.get("eval_points", 20)),
        train_bins=int(data.get("train_bins", 100)),
        baselines=grids[which],
    )
    for t in suite.tasks:
        check_task(t)
    return suite


# ------------------------------------------------------------------------------ building

_MLP_KEYS = {"dataset", "hidden_sizes", "batch_size", "activation", "resolution", "data_dir"}
_CONV_KEYS = _MLP_KEYS - {"hidden_sizes"} | {"channels", "kernel_sizes", "strides", "grayscale"}
_LM_KEYS = {"corpus", "model", "hidden", "layers", "heads", "batch_size", "seq_len", "data_dir"}
_ALLOWED = {"mlp": _MLP_KEYS, "conv": _CONV_KEYS, "lm": _LM_KEYS}


def check_task(task: BenchTask) -> None:
    """Fails on options the task's kind does not know (before anything loads)."""
    if task.kind == "family":
        return
    unknown = set(dict(task.options)) - _ALLOWED[task.kind]
    if unknown:
        raise SuiteError(
            f"task {task.name!r}: unknown options {sorted(unknown)} for kind {task.kind!r}; "
            f"known: {sorted(_ALLOWED[task.kind])}"
        )


def missing_data(task: BenchTask, data_dir: str | None = None) -> str | None:
    """Why `task` cannot run here (its data are not available), or None if it can.

    Looks for the files only (cheap); the message is the loader's own, naming every place
    looked and how to get the data.
    """
    from tasks.datasets import DatasetNotFoundError, locate_dataset  # noqa: PLC0415
    from tasks.text import load_text  # noqa: PLC0415

    data_dir = task.option("data_dir", data_dir)
    try:
        if task.kind in ("mlp", "conv"):
            locate_dataset(task.option("dataset"), data_dir)
        elif task.kind == "lm":
            load_text(task.option("corpus", "pydoc"), data_dir)
        else:
            fam = _thaw(task.option("family"))
            kinds, root = fam["kinds"], fam.get("data_dir") or data_dir
            names = [*(fam["datasets"] if "mlp" in kinds else ()),
                     *(fam["conv_datasets"] if "conv" in kinds else ())]  # fmt: skip
            for name in dict.fromkeys(names):
                locate_dataset(name, root)
            for corpus in fam["lm_corpora"] if "lm" in kinds else ():
                load_text(corpus, root)
    except DatasetNotFoundError as e:
        return str(e)
    return None


@lru_cache(maxsize=4)
def _family(family_json: str) -> Any:
    from meta_train.config import from_dict  # noqa: PLC0415
    from tasks.family import TaskFamily  # noqa: PLC0415

    # from_dict checks the section and turns JSON lists back into the config's tuples.
    return TaskFamily(from_dict({"task_family": json.loads(family_json)}).task_family)


@lru_cache(maxsize=8)
def _device_data(name: str, data_dir: str | None, resolution: int | None, grayscale: bool):
    from tasks.datasets import load_dataset  # noqa: PLC0415
    from tasks.device_data import to_device  # noqa: PLC0415

    ds = load_dataset(name, data_dir, resolution=resolution, grayscale=grayscale)
    return to_device([ds.splits]), ds.num_classes


def build_task(task: BenchTask, data_dir: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Builds the task of `task` (loading its data onto the device).

    Args:
      task: the description.
      data_dir: where to look for dataset files first (a task's own `data_dir` wins).

    Returns:
      `(task, info)`: a task of `tasks/` and a JSON-friendly description (with 'kind').

    Raises:
      DatasetNotFoundError: the data are not available here.
      SuiteError: bad options.
    """
    check_task(task)
    opts = _thaw(task.options) if task.options else {}
    data_dir = opts.pop("data_dir", data_dir)
    if task.kind == "family":
        import jax  # noqa: PLC0415

        family = _family(json.dumps(opts["family"], sort_keys=True))
        key = jax.random.fold_in(jax.random.PRNGKey(opts["seed"]), _held_out_stream())
        keys = jax.random.split(key, opts["num_tasks"])
        built, info = family.sample_with_info(keys[opts["index"]])
        return built, {**info, "kind": info.get("kind", "mlp")}
    info = {"kind": task.kind, **opts}
    if task.kind == "lm":
        from tasks.language import lm_task  # noqa: PLC0415
        from tasks.text import load_text  # noqa: PLC0415

        corpus = load_text(opts.pop("corpus", "pydoc"), data_dir)
        return lm_task(corpus, **opts), info
    data, num_classes = _device_data(
        opts.pop("dataset"), data_dir, opts.pop("resolution", None), opts.pop("grayscale", False)
    )
    activation = opts.pop("activation", "relu")
    if task.kind == "mlp":
        from tasks.classification import mlp_task  # noqa: PLC0415

        return mlp_task(data, num_classes=num_classes, activations=(activation,), **opts), info
    from tasks.conv import conv_task  # noqa: PLC0415

    return conv_task(data, num_classes=num_classes, activations=(activation,), **opts), info


def _held_out_stream() -> int:
    from meta_train.build import HELD_OUT_STREAM  # noqa: PLC0415

    return HELD_OUT_STREAM
