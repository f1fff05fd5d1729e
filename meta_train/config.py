"""Run configurations: typed sections loaded from TOML, with command-line overrides.

A config file has the sections below; every key is optional (defaults here). Unknown
sections or keys, values of the wrong type and values outside their range raise
`ConfigError` naming the key and saying what is allowed. What every key may hold is
declared once, in `RULES` (one rule per key of every section; `[lopt]` holds `kind` and
that kind's options, see `LOptConfig`); relations between keys
(`meta.window <= meta.min_episode_len <= meta.max_episode_len`, ...) are checked in the
section's `__post_init__`. Overrides are `section.key=value` strings whose value is parsed
as TOML (`meta.outer_steps=50`, `task_family.datasets=["mnist1d"]`, `run.name="x"` or
`run.name=x`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import importlib
import json
import math
import tomllib
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tasks.family import FamilyConfig


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


# ---------------------------------------------------------------------------- value rules


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return repr(list(value))
    return repr(value)


def _holds(test: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(test(value))
    except (TypeError, ValueError):  # a value of another type (direct construction)
        return False


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one value may be: `allowed` says it in words for the message, `test` checks it."""

    allowed: str
    test: Callable[[Any], bool]

    def describe(self) -> str:
        return self.allowed

    def check(self, value: Any, where: str) -> None:
        if not _holds(self.test, value):
            raise ConfigError(f"{where} must be {self.allowed}; got {_show(value)}")


@dataclasses.dataclass(frozen=True)
class OneOf:
    """One of a set of names; `names` is called when checking (registries import lazily)."""

    names: Callable[[], Sequence[str]]

    def describe(self) -> str:
        return f"one of {', '.join(map(repr, self.names()))}"

    def check(self, value: Any, where: str) -> None:
        if value not in list(self.names()):
            raise ConfigError(f"{where} must be {self.describe()}; got {_show(value)}")


@dataclasses.dataclass(frozen=True)
class Items:
    """A list whose every item follows `item` (`non_empty`: at least one item)."""

    item: Rule | OneOf | Items
    non_empty: bool = True
    allowed: str = ""  # overrides the generated description

    def describe(self) -> str:
        kind = "a non-empty list" if self.non_empty else "a list"
        return self.allowed or f"{kind}, each item {self.item.describe()}"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, list | tuple) or (self.non_empty and not value):
            raise ConfigError(f"{where} must be {self.describe()}; got {_show(value)}")
        for i, v in enumerate(value):
            self.item.check(v, f"{where}[{i}]")


def _finite(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)


def _int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int)


def int_at_least(low: int, note: str = "") -> Rule:
    return Rule(f"an integer >= {low}{note}", lambda v: _int(v) and v >= low)


POSITIVE = Rule("a finite number > 0", lambda v: _finite(v) and v > 0)
DECAY = Rule("a number in [0, 1)", lambda v: _finite(v) and 0 <= v < 1)
ANY_STR = Rule("a string", lambda v: isinstance(v, str))
NON_EMPTY_STR = Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
BOOL = Rule("true or false", lambda v: isinstance(v, bool))
SEED = Rule(
    "an integer in [0, 2**32 - 1] (larger seeds wrap around to smaller ones)",
    lambda v: _int(v) and 0 <= v < 2**32,
)


RANGE_OR_OFF = Rule(
    "[] (off) or [low, high] with 0 < low <= high, both finite",
    lambda v: len(v) == 0 or (len(v) == 2 and all(map(_finite, v)) and 0 < v[0] <= v[1]),
)


def _names(module: str, attr: str, *, sort: bool = False) -> Callable[[], Sequence[str]]:
    """The names of a registry (`module.attr`), imported only when a value is checked: the
    registries live in jax- and flax-heavy modules."""

    def names() -> Sequence[str]:
        values = getattr(importlib.import_module(module), attr)
        return sorted(values) if sort else values

    return names


_estimators = _names("meta_train.estimators", "ESTIMATORS")
_objectives = _names("meta_train.estimators", "OBJECTIVES")
_staggers = _names("meta_train.estimators", "STAGGERS")
_lopt_kinds = _names("lopt.registry", "LOPTS", sort=True)
_step_schedules = _names("lopt.base", "STEP_SCHEDULES")
_datasets = _names("tasks.datasets", "DATASETS")
_kinds = _names("tasks.family", "KINDS")
# Meta-validation's own names live here, not in the jax-heavy `meta_train.validation`
# (which imports this module: a lazy lookup there was circular when it was imported first).
VALID_METRICS = ("final", "mean")
GUARD_ACTIONS = ("warn", "lower_lr", "stop")
_lm_models = _names("tasks.language", "MODELS")
_activations = _names("tasks.classification", "ACTIVATIONS", sort=True)


RULES: dict[str, dict[str, Rule | OneOf | Items]] = {
    "run": {
        "name": ANY_STR,  # "" names the wandb run after the output folder
        "out_dir": NON_EMPTY_STR,
        "seed": SEED,
        "wandb_mode": OneOf(lambda: ("offline", "online", "disabled")),
        "wandb_project": NON_EMPTY_STR,
        "checkpoint_every": int_at_least(1),
        "max_to_keep": int_at_least(1),
        "log_every": int_at_least(1),
    },
    "task_family": {
        "kinds": Items(OneOf(_kinds)),
        "kind_weights": Items(POSITIVE, non_empty=False),
        "datasets": Items(OneOf(_datasets)),
        "hidden_sizes": Items(
            Items(int_at_least(1), non_empty=False),  # [] is a linear classifier
            allowed="a non-empty list of width lists like [[32], [64, 64]] (widths >= 1)",
        ),
        "activations": Items(OneOf(_activations)),
        "batch_sizes": Items(int_at_least(1)),
        "init_scale": Rule(
            "[low, high] with 0 < low <= high, both finite",
            lambda v: len(v) == 2 and all(map(_finite, v)) and 0 < v[0] <= v[1],
        ),
        "conv_datasets": Items(OneOf(_datasets)),
        "conv_channels": Items(
            Items(int_at_least(1)),
            allowed="a non-empty list of channel lists like [[16, 32], [32, 32, 64]]",
        ),
        "conv_strides": Items(
            Items(int_at_least(1)),
            allowed="a non-empty list of stride lists, one per conv_channels entry",
        ),
        "conv_kernel_sizes": Items(int_at_least(1)),
        "conv_batch_sizes": Items(int_at_least(1)),
        "lm_corpora": Items(NON_EMPTY_STR),
        "lm_models": Items(OneOf(_lm_models)),
        "lm_hidden": Items(int_at_least(1)),
        "lm_layers": Items(int_at_least(1)),
        "lm_seq_lens": Items(int_at_least(2)),
        "lm_batch_sizes": Items(int_at_least(1)),
        "lm_heads": int_at_least(1),
        "reparam_scale": RANGE_OR_OFF,
        "loss_scale": RANGE_OR_OFF,
        "label_noise": Rule("a fraction in [0, 1] (0: off)", lambda v: _finite(v) and 0 <= v <= 1),
        "resolution": int_at_least(0, " (0 keeps the images' size)"),
        "grayscale": BOOL,
        "data_dir": ANY_STR,  # "" uses LOPT_DATA_DIR and the default places
        "valid_size": Rule("a fraction in (0, 1)", lambda v: _finite(v) and 0 < v < 1),
    },
    # [lopt]: `kind`, then rules of options that learned optimizers share (same name, same
    # meaning); an option without a rule here is checked by its class's __post_init__.
    "lopt": {
        "kind": OneOf(_lopt_kinds),
        "hidden_size": int_at_least(1),
        "hidden_layers": int_at_least(0, " (0: some kinds allow a linear network)"),
        "momentum_decays": Items(DECAY),
        "rms_decay": DECAY,
        "step_mult": POSITIVE,
        "exp_mult": POSITIVE,
        "step_schedule": OneOf(_step_schedules),
        "step_schedule_final": Rule("a number in [0, 1]", lambda v: _finite(v) and 0 <= v <= 1),
    },
    "meta": {
        "estimator": OneOf(_estimators),
        "num_pairs": int_at_least(1),
        "sigma": POSITIVE,
        "window": int_at_least(1),
        "min_episode_len": int_at_least(1),
        "max_episode_len": int_at_least(1),
        "outer_steps": int_at_least(1),
        "stop_after": int_at_least(0, " (0: meta.outer_steps)"),
        "outer_lr": POSITIVE,
        "outer_lr_schedule": OneOf(_names("meta_train.learner", "SCHEDULES")),
        "outer_lr_final": Rule("a fraction in (0, 1]", lambda v: _finite(v) and 0 < v <= 1),
        "grad_clip": POSITIVE,
        "loss_clip": POSITIVE,
        "task_groups": int_at_least(1),
        "switch_every": int_at_least(0, " (0: groups keep their template)"),
        "objective": OneOf(_objectives),
        "stagger": OneOf(_staggers),
        "sign_diff": BOOL,
        "diff_clip": Rule("a finite number >= 0 (0: off)", lambda v: _finite(v) and v >= 0),
        "late_weight": Rule("a finite number >= 0 (0: off)", lambda v: _finite(v) and v >= 0),
        "init_from": ANY_STR,  # "" draws θ fresh; checked against the network when built
    },
    "eval": {
        "num_tasks": int_at_least(1),
        "num_seeds": int_at_least(1),
        "num_steps": int_at_least(0, " (0: meta.max_episode_len)"),
        "adam_lrs": Items(POSITIVE),
        "eval_every": int_at_least(0, " (0: only at the start and the end)"),
    },
    "valid": {
        "every": int_at_least(0, " (0: no meta-validation)"),
        "num_tasks": int_at_least(1),
        "num_seeds": int_at_least(1),
        "points": int_at_least(1),
        "adam_lr": POSITIVE,
        "metric": OneOf(lambda: VALID_METRICS),
        "guard_margin": Rule("a finite number >= 0", lambda v: _finite(v) and v >= 0),
        "guard_patience": int_at_least(1),
        "guard_action": OneOf(lambda: GUARD_ACTIONS),
        "guard_lr_factor": Rule("a number in (0, 1)", lambda v: _finite(v) and 0 < v < 1),
        "weight_decay_per_epoch": Rule(
            "a finite number >= 0 (0: off)", lambda v: _finite(v) and v >= 0
        ),
    },
    "server": {
        "backend": OneOf(lambda: ("in_process", "ray")),
        "workers": int_at_least(1),
        "mode": OneOf(lambda: ("sync", "async")),
        "meta_batch": int_at_least(0, " (0: one estimate per worker)"),
        "max_staleness": int_at_least(0),
        "ray_address": ANY_STR,
        "pin_cores": Rule("true or false", lambda v: isinstance(v, bool)),
        "worker_timeout_s": Rule("a finite number > 0", lambda v: _finite(v) and v > 0),
        "queue_depth": int_at_least(1),
    },
}
"""What every config key may hold, per section: the one place for per-key rules."""


def check_section(section: str, obj: Any) -> None:
    """Checks every field of a section dataclass against `RULES[section]`."""
    rules = RULES[section]
    for field in dataclasses.fields(obj):
        rules[field.name].check(getattr(obj, field.name), f"{section}.{field.name}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where and how a run writes.

    Attributes:
      name: run name (wandb run name, default output folder).
      out_dir: output folder for checkpoints, config, metrics, wandb files, evaluation.
      seed: the seed every random stream of the run derives from.
      wandb_mode: 'offline' (default: no login, no network), 'online' or 'disabled'.
      wandb_project: wandb project name.
      checkpoint_every: save a checkpoint every this many outer steps (and at the end).
      max_to_keep: checkpoints kept on disk.
      log_every: log metrics every this many outer steps.

    Where the run lives (out_dir) is not part of its identity: a moved or copied run folder
    resumes under its new path.
    """

    name: str = "default"
    out_dir: str = "runs/default"
    seed: int = 0
    wandb_mode: str = "offline"
    wandb_project: str = "lopt-meta"
    checkpoint_every: int = 50
    max_to_keep: int = 3
    log_every: int = 10

    def __post_init__(self):
        check_section("run", self)


@dataclasses.dataclass(frozen=True, init=False)
class LOptConfig:
    """The learned optimizer: `kind` plus that kind's options.

    `[lopt]` holds `kind` and any options of that kind's class in `lopt.registry.LOPTS`
    (e.g. `lopt.mlp_lopt.MLPLOpt` for 'mlp'); options left out take the class's defaults,
    and the resolved options (all of them) are what a run saves, so a checkpoint keeps
    loading the optimizer it trained when defaults change. A checkpoint saved before an
    option existed loads with that option's default (e.g. `step_schedule = "constant"`,
    which is how such checkpoints were trained). Options read as attributes:
    `config.lopt.hidden_size`.

    Attributes:
      kind: a key of `lopt.registry.LOPTS`.
      options: the kind's resolved options, as sorted (name, value) pairs.
    """

    kind: str
    options: tuple[tuple[str, Any], ...]

    def __init__(self, kind: str = "mlp", **options: Any):
        RULES["lopt"]["kind"].check(kind, "lopt.kind")
        cls = importlib.import_module("lopt.registry").LOPTS[kind]
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(f'lopt.{k}' for k in unknown)} for lopt kind "
                f"{kind!r}; its keys: {sorted(fields)}"
            )
        hints = typing.get_type_hints(cls)
        values = {k: _coerce(v, hints[k], f"lopt.{k}") for k, v in options.items()}
        for k, v in values.items():  # shared rules first, so every message is alike
            if k in RULES["lopt"]:
                RULES["lopt"][k].check(v, f"lopt.{k}")
        try:
            built = cls(**values)
        except ValueError as e:
            raise ConfigError(f"[lopt] {e}") from e
        resolved = {f.name: getattr(built, f.name) for f in dataclasses.fields(cls)}
        resolved = {k: tuple(v) if isinstance(v, list) else v for k, v in resolved.items()}
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "options", tuple(sorted(resolved.items())))

    def __getattr__(self, name: str) -> Any:
        # Called only for names that are not fields: the kind's options.
        if name.startswith("__") or name == "options":
            raise AttributeError(name)
        for key, value in self.options:
            if key == name:
                return value
        raise AttributeError(f"lopt kind {self.kind!r} has no option {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """`{"kind": ..., **options}`, as saved in config.json and checkpoints."""
        return {"kind": self.kind, **dict(self.options)}


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    """Meta-training.

    Attributes:
      estimator: outer-gradient estimator: 'pes', 'es_single', 'tes', 'full_es' or 'tbptt'
        (see `meta_train.estimators`). full_es needs window = min/max_episode_len.
      num_pairs: antithetic pairs (2 × num_pairs inner runs per outer step).
      sigma: standard deviation of the ES perturbations.
      window: truncation window K (inner steps per outer step).
      min_episode_len, max_episode_len: episode lengths T are sampled log-uniformly in this
        range (rounded to whole windows) at every reset.
      outer_steps: outer (meta) steps.
      stop_after: end the run after this many outer steps, its schedules still spanning
        outer_steps (0: run all outer_steps). The first N steps of a longer recipe, exactly:
        the equal-budget cut that ablations of that recipe compare against.
      outer_lr: learning rate of the outer Adam.
      outer_lr_schedule: 'constant', or 'cosine' (decay to outer_lr × outer_lr_final over
        meta.outer_steps; a resumed run with more outer steps stretches the rest of it).
      outer_lr_final: the fraction of outer_lr a cosine schedule ends at.
      grad_clip: global-norm clip of the meta-gradient.
      loss_clip: clip normalised task losses (the loss divided by ln(num_classes), the
        uniform predictor's, see `meta_train.lopt_problem`) at this value (NaN maps to it).
      task_groups: how many task shapes (templates) are in play at once; the particles are
        split into this many groups, each training tasks of one template.
      switch_every: every this many outer steps one group, in turn, takes the next
        template of a sequence that visits every template of the family once per cycle (in
        a random order per cycle), with fresh particles; 0: each group keeps its first
        template for the whole run (see `meta_train.groups`).
      objective: per-window objective: 'mean' (mean training loss over the window, divided
        by K), 'final' (training loss at the window's last step) or 'valid_final' (loss of a
        validation batch at the end of the window).
      stagger: 'truncate' (first episodes cut at a random whole window), 'burn_in' (first
        run each pair a random number of windows, discarding their gradients) or 'none'.
      sign_diff: use only the sign of each antithetic loss difference.
      diff_clip: clip antithetic loss differences to ±diff_clip (0: off).
      late_weight: weight each window by the episode's progress at its end, raised to this
        power (0: all windows alike; ES estimators only): the meta-objective then leans on
        the end of training, where overfitting shows (`WindowObjective.late_weight`).
      init_from: start from these meta-parameters instead of fresh ones: a checkpoint
        directory of an earlier run (its best step) or the name of a shipped optimizer
        (`lopt.pretrained()`, its hash checked). The learned optimizer's kind and network
        must match (`meta_train.build.initial_theta`); "" (default) draws θ from the seed.
        Fine-tunes a trained rule on another family; a resumed run ignores it.

    Learning rates, sigma and the clips are finite and > 0 (diff_clip >= 0); counts >= 1.
    """

    estimator: str = "pes"
    num_pairs: int = 8
    sigma: float = 0.01
    window: int = 20
    min_episode_len: int = 100
    max_episode_len: int = 400
    outer_steps: int = 200
    stop_after: int = 0
    outer_lr: float = 3e-3
    outer_lr_schedule: str = "constant"
    outer_lr_final: float = 0.1
    grad_clip: float = 1.0
    loss_clip: float = 1.5
    task_groups: int = 1
    switch_every: int = 0
    objective: str = "mean"
    stagger: str = "truncate"
    sign_diff: bool = False
    diff_clip: float = 0.0
    late_weight: float = 0.0
    init_from: str = ""

    def __post_init__(self):
        check_section("meta", self)
        if self.estimator == "tbptt" and self.late_weight:
            raise ConfigError("meta.late_weight weights ES differences: tbptt takes 0")
        if self.estimator == "full_es" and not (
            self.window == self.min_episode_len == self.max_episode_len
        ):
            raise ConfigError(
                "meta.estimator='full_es' runs whole episodes: set meta.window = "
                "meta.min_episode_len = meta.max_episode_len"
            )
        if not self.window <= self.min_episode_len <= self.max_episode_len:
            raise ConfigError(
                "meta.window <= meta.min_episode_len <= meta.max_episode_len must hold, got "
                f"{self.window}, {self.min_episode_len}, {self.max_episode_len}"
            )
        if self.num_pairs % self.task_groups:
            raise ConfigError(
                "meta.num_pairs must be a multiple of meta.task_groups (the pairs are split "
                f"evenly between the groups); got {self.num_pairs} and {self.task_groups}"
            )

    @property
    def inner_steps_per_outer_step(self) -> int:
        """Inner steps of all unrolls in one outer step (TBPTT runs one member per particle)."""
        return (1 if self.estimator == "tbptt" else 2) * self.num_pairs * self.window


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation against tuned Adam on held-out tasks.

    Attributes:
      num_tasks: held-out tasks sampled from the family (seeds never used in meta-training).
      num_seeds: training seeds per task and optimizer (mean ± std over tasks × seeds).
      num_steps: training steps (the horizon; 0 means meta.max_episode_len).
      adam_lrs: Adam's learning-rate grid (finite, > 0); the best on validation loss is
        reported.
      eval_every: record losses every this many steps for the curves (0: only at the start
        and the end).
    """

    num_tasks: int = 3
    num_seeds: int = 3
    num_steps: int = 0
    adam_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    eval_every: int = 10

    def __post_init__(self):
        check_section("eval", self)


@dataclasses.dataclass(frozen=True)
class ValidConfig:
    """Meta-validation during meta-training, best-checkpoint selection and the guard
    (see `meta_train.validation`).

    Attributes:
      every: validate every this many outer steps, and before the first and after the last
        (0: never; no best checkpoint is then kept).
      num_tasks: held-out tasks, drawn once per run from the family's held-out stream (other
        tasks than the evaluation's), spread over its templates and over its horizons
        (geometrically from meta.min_episode_len to meta.max_episode_len).
      num_seeds: training seeds per task (fixed for the run).
      points: validation losses recorded per training run: every horizon // points steps
        (and at the end when the horizon is not a multiple of that).
      adam_lr: the learning rate of the Adam reference, run once at the start on the same
        tasks and seeds.
      metric: what the score compares with Adam: 'final' (validation loss at the end of
        each run) or 'mean' (mean over the recorded points: how fast it gets there). The
        score is the mean over tasks of the learned optimizer's value divided by Adam's;
        lower is better, and a diverged run makes it infinite.
      guard_margin: an evaluation counts as worse when its score exceeds the best by more
        than this fraction of the best.
      guard_patience: the guard fires after this many worse evaluations in a row.
      guard_action: 'warn' (say so and go on), 'lower_lr' (also multiply the outer learning
        rate by guard_lr_factor) or 'stop' (end meta-training). The best checkpoint is kept
        in every case.
      guard_lr_factor: the factor of 'lower_lr'.
      weight_decay_per_epoch: score the rule as `lopt.pretrained` ships it, with a decoupled
        weight decay of this value / the task's steps per epoch (`tasks.epochs`) on each
        validation task (0: the rule's own decay). Without it a task seen for many epochs
        overfits and its ratio can dominate the score (docs/generalist.md). The learned
        optimizer must have a `weight_decay` option.
    """

    every: int = 250
    num_tasks: int = 4
    num_seeds: int = 2
    points: int = 10
    adam_lr: float = 1e-3
    metric: str = "final"
    guard_margin: float = 0.05
    guard_patience: int = 3
    guard_action: str = "lower_lr"
    guard_lr_factor: float = 0.5
    weight_decay_per_epoch: float = 0.0

    def __post_init__(self):
        check_section("valid", self)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Where the meta-gradient is estimated: the gradient server (`meta_train.server`).

    The learner owns θ, the outer optimizer, checkpoints and logging; workers own particles
    and return gradient estimates tagged with the θ version they used.

    Attributes:
      backend: 'in_process' (default: workers are objects of this process, run one after
        another; with one worker both halves run as one jitted call per outer step) or
        'ray' (each worker a Ray actor, in parallel).
      workers: gradient workers. Each holds `meta.num_pairs` pairs in `meta.task_groups`
        groups, so one outer step with W workers averages W times the pairs.
      mode: 'sync' (every outer step waits for one estimate from every worker, all of the
        current θ) or 'async' (workers never wait; the learner applies `meta_batch`
        estimates at a time, of whatever θ version each worker had).
      meta_batch: estimates per outer step (0: `workers`).
      max_staleness: estimates computed from θ more than this many versions old are dropped
        (counted and logged) rather than applied. Sync mode has none.
      ray_address: '' starts Ray on this machine (`ray.init()`); else the address of an
        existing cluster ('auto', 'ray://host:10001', ...).
      pin_cores: pin worker i of a Ray backend to core i % cores of its machine (one JAX
        CPU device each), so workers do not fight over cores.
      worker_timeout_s: a Ray worker whose estimate takes longer than this is declared lost
        and replaced (its first estimate, which loads datasets and compiles, gets at least
        `meta_train.server.STARTUP_GRACE_S`).
      queue_depth: estimates queued per worker (async mode only). 1: a worker that sends an
        estimate waits for the learner's next θ before it starts again (it idles for the
        round trip and the update). 2: its next estimate is already queued, so it starts at
        once, on the θ that estimate was queued with (one version older): the round trip is
        hidden, and estimates are about one version staler.
    """

    backend: str = "in_process"
    workers: int = 1
    mode: str = "sync"
    meta_batch: int = 0
    max_staleness: int = 2
    ray_address: str = ""
    pin_cores: bool = True
    worker_timeout_s: float = 600.0
    queue_depth: int = 1

    def __post_init__(self):
        check_section("server", self)
        if self.queue_depth > 1 and self.mode != "async":
            raise ConfigError(
                f"server.queue_depth={self.queue_depth} needs server.mode='async': a "
                "synchronous step waits for every worker's estimate of the newest θ"
            )

    @property
    def estimates_per_step(self) -> int:
        """Estimates averaged per outer step: every worker's in sync mode, `meta_batch`
        (0: one per worker) in async mode."""
        return self.workers if self.mode == "sync" else self.meta_batch or self.workers


@dataclasses.dataclass(frozen=True)
class Config:
    run: RunConfig = RunConfig()
    task_family: FamilyConfig = FamilyConfig()
    lopt: LOptConfig = dataclasses.field(default_factory=LOptConfig)
    meta: MetaConfig = MetaConfig()
    eval: EvalConfig = EvalConfig()
    valid: ValidConfig = ValidConfig()
    server: ServerConfig = ServerConfig()

    def __post_init__(self):
        # The other sections check themselves; FamilyConfig lives in tasks.family.
        check_section("task_family", self.task_family)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d = {k: v.to_dict() if k == "lopt" else dataclasses.asdict(v) for k, v in d.items()}
        return json.loads(json.dumps(d))

    def lopt_kwargs(self) -> dict[str, Any]:
        return self.lopt.to_dict()


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Checks `value` against a type hint, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} is not a {hint}")
    if origin is collections.abc.Sequence:  # options typed Sequence[X] read as tuple[X, ...]
        return _coerce(value, tuple[typing.get_args(hint)[0], ...], where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {value!r}")
        return tuple(
            _coerce(v, a, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")


def _build_section(cls: type, values: dict[str, Any], section: str):
    if cls is LOptConfig:  # the kind decides which keys exist
        return LOptConfig(**values)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"known keys of [{section}]: {sorted(fields)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    for k, v in kwargs.items():  # before the class's own checks, so every message is alike
        RULES[section][k].check(v, f"{section}.{k}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"[{section}] {e}") from e


def from_dict(d: dict[str, Any]) -> Config:
    """Builds a validated `Config` from nested dictionaries (unknown keys are errors)."""
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(d) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; known: {sorted(sections)}")
    built = {}
    for name, values in d.items():
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table of keys")
        built[name] = _build_section(hints[name], values, name)
    return Config(**built)


def parse_override(item: str) -> tuple[str, str, Any]:
    """Splits a `section.key=value` override into section, key and its TOML-parsed value."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    path, raw = item.split("=", 1)
    keys = path.strip().split(".")
    if len(keys) != 2 or not all(keys):
        raise ConfigError(f"override {item!r}: the key must be section.key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings: run.name=my-run
    return keys[0], keys[1], value


def apply_overrides(d: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Sets every `section.key=value` of `overrides` in the nested dict `d` (in place).

    An override of `lopt.kind` to another kind than `d`'s starts `[lopt]` afresh: the options
    `d` held were that kind's (`hidden_size` of 'mlp' is not `hidden_size` of
    'learned_adam'), so they are dropped and the new kind starts from its own defaults;
    options given as overrides (before or after) are kept and checked against the new kind.
    """
    base_kind = d.get("lopt", {}).get("kind", "mlp") if isinstance(d.get("lopt"), dict) else None
    given: set[str] = set()
    for item in overrides:
        section, key, value = parse_override(item)
        d.setdefault(section, {})
        if not isinstance(d[section], dict):
            raise ConfigError(f"[{section}] must be a table of keys")
        if (section, key) == ("lopt", "kind") and value != base_kind:
            d["lopt"] = {k: v for k, v in d["lopt"].items() if k in given}
        if section == "lopt":
            given.add(key)
        d[section][key] = value
    return d


def _read_config_file(path: Path) -> dict[str, Any]:
    """A config file's sections: TOML, or JSON for a run folder's resolved ``config.json``."""
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give a TOML file")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            d = json.loads(text)
            if not isinstance(d, dict):
                raise ConfigError(f"{path}: a JSON config must be an object of sections")
            return d
        return tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {e.start}); config files are UTF-8"
        ) from e
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from e


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Loads a config file (or the defaults) and applies `section.key=value` overrides.

    Args:
      path: a TOML file (``configs/*.toml``), a run folder's resolved ``config.json``, or None
        for the built-in defaults.
      overrides: ``section.key=value`` strings, applied in order.

    Returns:
      The validated `Config`.

    Raises:
      ConfigError: the file is missing or unreadable, or a key or value is invalid.
    """
    d: dict[str, Any] = {} if path is None else _read_config_file(Path(path))
    return from_dict(apply_overrides(d, overrides))


def save_config(config: Config, path: str | Path) -> None:
    """Writes the resolved config as JSON."""
    Path(path).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
