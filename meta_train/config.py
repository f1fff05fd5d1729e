"""Run configurations: typed sections loaded from TOML, with command-line overrides.

A config file has the sections below; every key is optional (defaults here). Unknown
sections or keys and values of the wrong type raise `ConfigError` naming the key.
Overrides are `section.key=value` strings whose value is parsed as TOML
(`meta.outer_steps=50`, `task_family.datasets=["mnist1d"]`, `run.name="x"` or `run.name=x`).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from tasks.family import MLPFamilyConfig


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


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
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ConfigError(
                f"run.wandb_mode must be offline, online or disabled, got {self.wandb_mode!r}"
            )


@dataclasses.dataclass(frozen=True)
class LOptConfig:
    """The learned optimizer: `kind` plus that kind's options (see `lopt.registry`).

    Attributes:
      kind: 'mlp' (per-parameter MLP, LOLv2 style).
      hidden_size, hidden_layers, momentum_decays, rms_decay, step_mult, exp_mult: options of
        the 'mlp' kind (see `lopt.mlp_lopt.MLPLOpt`).
    """

    kind: str = "mlp"
    hidden_size: int = 32
    hidden_layers: int = 2
    momentum_decays: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)
    rms_decay: float = 0.999
    step_mult: float = 1e-3
    exp_mult: float = 1e-3


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
      outer_lr: learning rate of the outer Adam.
      grad_clip: global-norm clip of the meta-gradient.
      loss_clip: clip task losses at loss_clip · ln(num_classes) (NaN maps to the clip).
      task_groups: how many task shapes are in play at once; the particles are split into
        this many groups, each with a shape sampled from the family for the whole run.
      objective: per-window objective: 'mean' (mean training loss over the window, divided
        by K), 'final' (training loss at the window's last step) or 'valid_final' (loss of a
        validation batch at the end of the window).
      stagger: 'truncate' (first episodes cut at a random whole window), 'burn_in' (first
        run each pair a random number of windows, discarding their gradients) or 'none'.
      sign_diff: use only the sign of each antithetic loss difference.
      diff_clip: clip antithetic loss differences to ±diff_clip (0: off).
    """

    estimator: str = "pes"
    num_pairs: int = 8
    sigma: float = 0.01
    window: int = 20
    min_episode_len: int = 100
    max_episode_len: int = 400
    outer_steps: int = 200
    outer_lr: float = 3e-3
    grad_clip: float = 1.0
    loss_clip: float = 1.5
    task_groups: int = 1
    objective: str = "mean"
    stagger: str = "truncate"
    sign_diff: bool = False
    diff_clip: float = 0.0

    def __post_init__(self):
        from meta_train.estimators import ESTIMATORS, OBJECTIVES, STAGGERS  # noqa: PLC0415

        for key, known in (
            ("estimator", ESTIMATORS),
            ("objective", OBJECTIVES),
            ("stagger", STAGGERS),
        ):
            if getattr(self, key) not in known:
                raise ConfigError(f"meta.{key}: unknown {getattr(self, key)!r}; known: {known}")
        if self.estimator == "full_es" and not (
            self.window == self.min_episode_len == self.max_episode_len
        ):
            raise ConfigError(
                "meta.estimator='full_es' runs whole episodes: set meta.window = "
                "meta.min_episode_len = meta.max_episode_len"
            )
        for k in ("num_pairs", "window", "outer_steps", "task_groups"):
            if getattr(self, k) < 1:
                raise ConfigError(f"meta.{k} must be >= 1")
        if not self.window <= self.min_episode_len <= self.max_episode_len:
            raise ConfigError(
                "meta.window <= meta.min_episode_len <= meta.max_episode_len must hold, got "
                f"{self.window}, {self.min_episode_len}, {self.max_episode_len}"
            )
        if self.num_pairs % self.task_groups:
            raise ConfigError("meta.num_pairs must be a multiple of meta.task_groups")
        if self.sigma <= 0:
            raise ConfigError("meta.sigma must be > 0")

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
      adam_lrs: Adam's learning-rate grid; the best on validation loss is reported.
      eval_every: record losses every this many steps for the curves.
    """

    num_tasks: int = 3
    num_seeds: int = 3
    num_steps: int = 0
    adam_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    eval_every: int = 10


@dataclasses.dataclass(frozen=True)
class Config:
    run: RunConfig = RunConfig()
    task_family: MLPFamilyConfig = MLPFamilyConfig()
    lopt: LOptConfig = LOptConfig()
    meta: MetaConfig = MetaConfig()
    eval: EvalConfig = EvalConfig()

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def lopt_kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self.lopt)


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
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"known keys of [{section}]: {sorted(fields)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
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


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    path, raw = item.split("=", 1)
    keys = path.strip().split(".")
    if len(keys) != 2:
        raise ConfigError(f"override {item!r}: the key must be section.key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings: run.name=my-run
    return keys, value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Loads a TOML config file (or the defaults) and applies `section.key=value` overrides."""
    d: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            d = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from e
    for item in overrides:
        (section, key), value = _parse_override(item)
        d.setdefault(section, {})
        if not isinstance(d[section], dict):
            raise ConfigError(f"[{section}] must be a table of keys")
        d[section][key] = value
    return from_dict(d)


def save_config(config: Config, path: str | Path) -> None:
    """Writes the resolved config as JSON."""
    Path(path).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
