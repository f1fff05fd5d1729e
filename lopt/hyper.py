"""Learned-hyperparameter optimizers: Adam with learned schedules, and a learned learning-rate
schedule on top of any optax optimizer.

These are the cheap, robust baselines that learned optimizers are measured against: Metz,
Maheswaranathan, Freeman, Poole, Sohl-Dickstein, "Tasks, stability, architecture, and
compute: Training more effective learned optimizers, and using them to train themselves"
(2020) compare with Adam whose hyperparameters are meta-learned; learning-rate (and
momentum) schedules as meta-parameters go back to Maclaurin, Duvenaud, Adams, "Gradient-based
hyperparameter optimization through reversible learning" (ICML 2015) and Franceschi,
Donini, Frasconi, Pontil, "Forward and reverse gradient-based hyperparameter optimization"
(ICML 2017). Adam is Kingma and Ba, "Adam: A method for stochastic optimization" (ICLR 2015).

Both optimizers here are ordinary `LearnedOptimizer`s whose meta-parameters θ are a few
hundred float32 numbers: the weights of a small MLP that maps training-progress features
(`lopt.common.progress_features`) to hyperparameters. Its output layer starts at zero, so
`init_meta` (and θ = 0) reproduces the hand-set optimizer exactly; every output goes through
a bound `r · tanh(o / r)` (slope 1 at 0, so small meta-steps act directly), so no θ gives a
β of 1, a zero or infinite ε, or an unbounded learning rate.

* `LearnedAdamLOpt`: Adam whose learning rate, β1, β2 and ε follow learned schedules, one set
  for the whole tree or (`per_tensor=True`) one per tensor, from per-tensor shape features.
* `LearnedScheduleLOpt`: a learned learning-rate schedule over an optax optimizer named in
  the config (`base`: adam, sgd with momentum 0.9, rmsprop, adamw, lion);
  `OptaxScheduleLOpt` does the same over any optax transformation object (Python only: a
  transformation is not JSON, so it cannot be in a config or the registry).

Numerics, as for every optimizer of `lopt` (see `lopt.mlp_lopt`): state in float32 whatever
the parameter dtype, the update cast back once; non-finite gradient entries get a zero update
and leave the per-parameter state untouched; non-float leaves (integer counters, `float0`
gradients) get zero updates; a tree without float leaves passes through. The loss is
accepted and ignored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lopt.base import MetaParams, Optimizer, check_num_steps, step_scale, step_schedule_problems
from lopt.common import (
    MAX_SQUARE,
    NUM_PROGRESS_FEATURES,
    NUM_TENSOR_FEATURES,
    capped_square,
    ema,
    float_leaves,
    join_updates,
    progress_features,
    split_tree,
    tensor_features,
)

# Gradient entries are clipped to ±sqrt(MAX_SQUARE) = ±1e19 before Adam's moments: beyond it
# the capped square would no longer be the square, and m / sqrt(v) would grow without bound.
MAX_GRAD = math.sqrt(MAX_SQUARE)
# A logit above this rounds to β = 1 in float32 (sigmoid(17) = 1 - 4e-8 still rounds below 1).
MAX_BETA_LOGIT = 16.0
# Order of LearnedAdamLOpt's network outputs.
ADAM_OUTPUTS = ("lr", "beta1", "beta2", "eps")


class _HyperMLP(nn.Module):
    """Features [n, in] -> outputs [n, num_outputs]; the output layer starts at zero."""

    hidden_size: int
    hidden_layers: int
    num_outputs: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(self.hidden_layers):
            x = jax.nn.relu(nn.Dense(self.hidden_size)(x))
        zeros = nn.initializers.zeros
        return nn.Dense(self.num_outputs, kernel_init=zeros, bias_init=zeros)(x)


def _count(hidden_size: int, hidden_layers: int, num_in: int, num_out: int) -> int:
    """The number of meta-parameters of `_HyperMLP`."""
    widths = [num_in] + [hidden_size] * hidden_layers + [num_out]
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))


def _bound(x: jax.Array, limit: float) -> jax.Array:
    """`limit · tanh(x / limit)`: the identity near 0, within ±limit everywhere.

    NaN (only reachable from inf - inf inside a network with enormous weights) maps to 0,
    the hand-set default, instead of poisoning the update.
    """
    if limit == 0:
        return jnp.zeros_like(x)
    return limit * jnp.tanh(jnp.nan_to_num(x, nan=0.0) / limit)


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _validate_common(lopt: Any) -> list[str]:
    """Problems with the options both optimizers share (network, learning rate, schedule)."""
    problems = []
    if not isinstance(lopt.hidden_size, int) or lopt.hidden_size < 1:
        problems.append(f"hidden_size must be an int >= 1, got {lopt.hidden_size!r}")
    if not isinstance(lopt.hidden_layers, int) or lopt.hidden_layers < 0:
        problems.append(f"hidden_layers must be an int >= 0, got {lopt.hidden_layers!r}")
    if not (math.isfinite(lopt.base_lr) and lopt.base_lr > 0):
        problems.append(f"base_lr must be a finite number > 0, got {lopt.base_lr}")
    if not (math.isfinite(lopt.lr_range) and 0 <= lopt.lr_range <= 20):
        # e^20 ≈ 5e8: any wider and the learning rate can overflow a float32 update.
        problems.append(f"lr_range must be in [0, 20], got {lopt.lr_range}")
    problems += step_schedule_problems(lopt)
    return problems


class LearnedAdamState(NamedTuple):
    """Inner-optimizer state (float32 whatever the parameter dtype).

    Attributes:
      mu: per float leaf, the first moment.
      nu: per float leaf, the second moment.
      one_minus_beta1_prod: 1 − Π_{s≤t} β1_s, per row of hyperparameters ([n_tensors] with
        `per_tensor`, else [1]): the running product of the β1s, kept as its complement.
      one_minus_beta2_prod: the same for β2.
      step: inner step counter (int32).
      num_steps: the training horizon the progress features refer to (int32).
    """

    mu: Any
    nu: Any
    one_minus_beta1_prod: jax.Array
    one_minus_beta2_prod: jax.Array
    step: jax.Array
    num_steps: jax.Array


@dataclasses.dataclass(frozen=True)
class LearnedAdamLOpt:
    """Adam whose learning rate, β1, β2 and ε follow learned schedules over training.

    A small MLP (`hidden_layers` ReLU layers of `hidden_size`) reads the progress features
    (`lopt.common.progress_features`) and, with `per_tensor`, the tensor's shape features
    (`tensor_features`: rank one-hot, log size, log fan-in); its outputs o give, per row
    (the whole tree, or each tensor), with `b_r(o) = r · tanh(o / r)`:

        lr = base_lr · exp(b_lr_range(o_lr)) · s(t)
        β1 = sigmoid(logit(beta1) + b_beta_range(o_β1))
        β2 = sigmoid(logit(beta2) + b_beta_range(o_β2))
        ε  = eps · exp(b_eps_range(o_ε))

    where `s(t)` is the fixed `step_schedule` times the 1/t decay past the horizon
    (`lopt.base`). The update of a float leaf with gradient g (entries clipped to ±1e19) is
    Adam's with time-varying β:

        m ← β1 m + (1 − β1) g,   v ← β2 v + (1 − β2) g²
        c1 ← β1 c1 + (1 − β1),   c2 ← β2 c2 + (1 − β2)     (c = 1 − Π_{s≤t} β_s, c₀ = 0)
        update = −lr · (m / c1) / (sqrt(v / c2) + ε)

    The bias correction divides by 1 − Π β, not 1 − β^t: with β changing over time the
    moments' weights sum to 1 − Π β, so only this makes a constant gradient g give m/c1 = g.
    The complement is accumulated directly (the same recursion as a moment of a gradient of
    ones) because 1 − Π β computed from a float32 product loses most of its digits for β2
    near 1. θ = 0 and `init_meta` (whose output layer is zero) give `optax.adam(base_lr,
    beta1, beta2, eps)`. A non-finite gradient entry leaves its m and v untouched; c1 and c2
    belong to the whole row and advance, as optax's step count does.

    Meta-parameters with the defaults: 212 (global: (8·16 + 16) + (16·4 + 4)); 324 with
    `per_tensor=True` (15 inputs: (15·16 + 16) + (16·4 + 4)); `num_meta_params` gives the
    count of any configuration.

    Attributes:
      per_tensor: one set of hyperparameters per tensor (the network also reads the
        tensor's shape features) instead of one for the whole tree.
      base_lr: the learning rate at θ = 0.
      beta1: β1 at θ = 0, in (0, 1).
      beta2: β2 at θ = 0, in (0, 1).
      eps: ε at θ = 0, > 0.
      hidden_size: width of the hyperparameter network.
      hidden_layers: its number of hidden layers (0: linear in the features).
      lr_range: bound of the log learning-rate offset: lr ∈ base_lr · [e^-r, e^r].
      beta_range: bound of the β logit offsets; logit(beta) + beta_range must stay below 16,
        where float32 would round β to 1.
      eps_range: bound of the log-ε offset: ε ∈ eps · [e^-r, e^r].
      step_schedule: 'constant' or 'cosine': the fixed multiplier of the learning rate over
        the declared horizon (`lopt.base.step_schedule`).
      step_schedule_final: the cosine schedule's multiplier at the horizon, in [0, 1].
    """

    per_tensor: bool = False
    base_lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    hidden_size: int = 16
    hidden_layers: int = 1
    lr_range: float = 3.0
    beta_range: float = 3.0
    eps_range: float = 5.0
    step_schedule: str = "constant"
    step_schedule_final: float = 0.0

    def __post_init__(self):
        problems = _validate_common(self)
        if not isinstance(self.per_tensor, bool):
            problems.append(f"per_tensor must be a bool, got {self.per_tensor!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0 < value < 1:
                problems.append(f"{name} must be in (0, 1), got {value}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            problems.append(f"eps must be a finite number > 0, got {self.eps}")
        if not (math.isfinite(self.beta_range) and self.beta_range >= 0):
            problems.append(f"beta_range must be a finite number >= 0, got {self.beta_range}")
        elif all(0 < b < 1 for b in (self.beta1, self.beta2)):
            top = max(_logit(self.beta1), _logit(self.beta2)) + self.beta_range
            if top > MAX_BETA_LOGIT:
                problems.append(
                    f"beta_range {self.beta_range} lets β reach sigmoid({top:.1f}), which "
                    f"float32 rounds to 1: keep logit(beta) + beta_range <= {MAX_BETA_LOGIT}"
                )
        if not (math.isfinite(self.eps_range) and 0 <= self.eps_range <= 20):
            problems.append(f"eps_range must be in [0, 20], got {self.eps_range}")
        if problems:
            raise ValueError("LearnedAdamLOpt: " + "; ".join(problems))

    @property
    def num_features(self) -> int:
        return NUM_PROGRESS_FEATURES + (NUM_TENSOR_FEATURES if self.per_tensor else 0)

    @property
    def num_meta_params(self) -> int:
        return _count(self.hidden_size, self.hidden_layers, self.num_features, len(ADAM_OUTPUTS))

    @property
    def _net(self) -> _HyperMLP:
        return _HyperMLP(self.hidden_size, self.hidden_layers, len(ADAM_OUTPUTS))

    def init_meta(self, key: jax.Array) -> MetaParams:
        """Returns fresh meta-parameters: flax params of the hyperparameter network, whose
        zero output layer makes the optimizer exactly Adam with the configured defaults."""
        return self._net.init(key, jnp.zeros((1, self.num_features)))["params"]

    def _num_rows(self, num_leaves: int) -> int:
        return num_leaves if self.per_tensor else 1

    def hyperparameters(
        self,
        theta: MetaParams,
        shapes: list[tuple[int, ...]],
        step: jax.Array,
        num_steps: jax.Array,
    ) -> dict[str, jax.Array]:
        """The hyperparameters that θ gives at `step` of `num_steps`.

        Args:
          theta: the meta-parameters.
          shapes: the float leaves' shapes (flattening order); only read with `per_tensor`.
          step: steps taken before this update (int).
          num_steps: the declared horizon (int).

        Returns:
          {'lr', 'beta1', 'beta2', 'eps'}: float32 arrays of one entry per float leaf with
          `per_tensor`, else of one entry. 'lr' is the step size applied, with the step
          schedule and the past-horizon decay.
        """
        step, num_steps = jnp.asarray(step), jnp.asarray(num_steps)
        progress = progress_features(step, num_steps)
        n = self._num_rows(len(shapes))
        x = jnp.broadcast_to(progress, (n, progress.shape[0]))
        if self.per_tensor:
            x = jnp.concatenate([x, jnp.asarray(tensor_features(shapes))], axis=1)
        out = self._net.apply({"params": theta}, x).T  # [4, n]
        lr = self.base_lr * jnp.exp(_bound(out[0], self.lr_range))
        return {
            "lr": step_scale(self, step, num_steps, lr),
            "beta1": jax.nn.sigmoid(_logit(self.beta1) + _bound(out[1], self.beta_range)),
            "beta2": jax.nn.sigmoid(_logit(self.beta2) + _bound(out[2], self.beta_range)),
            "eps": self.eps * jnp.exp(_bound(out[3], self.eps_range)),
        }

    def optimizer(self, theta: MetaParams) -> Optimizer:
        """Returns the optimizer with meta-parameters `theta`."""

        def init(params, num_steps) -> LearnedAdamState:
            check_num_steps(num_steps)
            leaves = float_leaves(params)
            rows = (self._num_rows(len(leaves)),)
            return LearnedAdamState(
                mu=[jnp.zeros(p.shape, jnp.float32) for p in leaves],
                nu=[jnp.zeros(p.shape, jnp.float32) for p in leaves],
                # Separate buffers: a training loop may donate the state.
                one_minus_beta1_prod=jnp.zeros(rows, jnp.float32),
                one_minus_beta2_prod=jnp.zeros(rows, jnp.float32),
                step=jnp.zeros((), jnp.int32),
                num_steps=jnp.asarray(num_steps, jnp.int32),
            )

        def update(grads, state: LearnedAdamState, params, loss=None):
            del loss  # hyperparameters depend on progress only
            split = split_tree(grads, params, len(state.mu))
            hp = self.hyperparameters(
                theta, [p.shape for p in split.params], state.step, state.num_steps
            )
            b1, b2 = hp["beta1"], hp["beta2"]
            c1 = state.one_minus_beta1_prod * b1 + (1 - b1)
            c2 = state.one_minus_beta2_prod * b2 + (1 - b2)
            mu, nu, updates = [], [], []
            for k, (g, finite, m, v) in enumerate(
                zip(split.grads, split.finite, state.mu, state.nu, strict=True)
            ):
                r = k if self.per_tensor else 0
                g = jnp.clip(g, -MAX_GRAD, MAX_GRAD)
                m = ema(m, g, b1[r], finite)
                v = ema(v, capped_square(g), b2[r], finite)
                mu.append(m)
                nu.append(v)
                # Same operation order as optax.adam, so θ = 0 matches it to round-off.
                direction = (m / c1[r]) / (jnp.sqrt(v / c2[r]) + hp["eps"][r])
                updates.append(-hp["lr"][r] * direction)
            new_state = LearnedAdamState(mu, nu, c1, c2, state.step + 1, state.num_steps)
            return join_updates(split, updates), new_state

        return Optimizer(init, update)


# The optimizers `LearnedScheduleLOpt(base=...)` names, each at learning rate 1: every optax
# alias ends with a scale by -learning_rate, so multiplying its update by a learning rate
# is the same optimizer at that learning rate.
BASE_OPTIMIZERS = {
    "adam": lambda: optax.adam(1.0),
    "sgd": lambda: optax.sgd(1.0, momentum=0.9),
    "rmsprop": lambda: optax.rmsprop(1.0),
    "adamw": lambda: optax.adamw(1.0),
    "lion": lambda: optax.lion(1.0),
}


class LearnedScheduleState(NamedTuple):
    """Inner-optimizer state.

    Attributes:
      base: the base transformation's state, built on float32 copies of the float leaves
        (so its moments are float32 whatever the parameter dtype).
      leaf_sizes: the sizes of the float leaves the state was built for (int32; its length
        is checked on every update).
      step: inner step counter (int32).
      num_steps: the training horizon the progress features refer to (int32).
    """

    base: Any
    leaf_sizes: jax.Array
    step: jax.Array
    num_steps: jax.Array


def _keep_state_where_non_finite(new: Any, old: Any, finite: list[jax.Array]) -> Any:
    """`new` base state, with the old entries kept where the gradient was non-finite.

    The base ran on the list of float leaves, so every per-parameter copy in its state (Adam's
    moments, SGD's trace, ...) is a list of arrays shaped like them: those are masked; other
    state (counters, factored statistics) is left as the base made it.
    """
    shapes = [f.shape for f in finite]

    def is_param_copy(x: Any) -> bool:
        return (
            isinstance(x, list)
            and len(x) == len(shapes)
            and all(getattr(a, "shape", None) == s for a, s in zip(x, shapes, strict=True))
        )

    def keep(n: Any, o: Any) -> Any:
        if not is_param_copy(n):
            return n
        return [jnp.where(f, a, b) for a, b, f in zip(n, o, finite, strict=True)]

    return jax.tree.map(keep, new, old, is_leaf=is_param_copy)


@dataclasses.dataclass(frozen=True)
class _LearnedSchedule:
    """A learned learning-rate schedule over a base optax transformation (see
    `LearnedScheduleLOpt`); subclasses say which transformation."""

    base_lr: float = 1e-3
    hidden_size: int = 16
    hidden_layers: int = 1
    lr_range: float = 3.0
    step_schedule: str = "constant"
    step_schedule_final: float = 0.0

    def _transformation(self) -> optax.GradientTransformation:
        raise NotImplementedError

    @property
    def num_meta_params(self) -> int:
        return _count(self.hidden_size, self.hidden_layers, NUM_PROGRESS_FEATURES, 1)

    @property
    def _net(self) -> _HyperMLP:
        return _HyperMLP(self.hidden_size, self.hidden_layers, 1)

    def init_meta(self, key: jax.Array) -> MetaParams:
        """Returns fresh meta-parameters: flax params of the schedule network, whose zero
        output layer makes the schedule the constant `base_lr`."""
        return self._net.init(key, jnp.zeros((1, NUM_PROGRESS_FEATURES)))["params"]

    def learning_rate(self, theta: MetaParams, step: jax.Array, num_steps: jax.Array) -> jax.Array:
        """The learning rate that θ gives at `step` of `num_steps`.

        Args:
          theta: the meta-parameters.
          step: steps taken before this update (int).
          num_steps: the declared horizon (int).

        Returns:
          A float32 scalar: `base_lr · exp(b(o)) · s(t)`, with the step schedule and the
          past-horizon decay in `s(t)`.
        """
        step, num_steps = jnp.asarray(step), jnp.asarray(num_steps)
        out = self._net.apply({"params": theta}, progress_features(step, num_steps)[None])
        lr = self.base_lr * jnp.exp(_bound(out[0, 0], self.lr_range))
        return step_scale(self, step, num_steps, lr)

    def optimizer(self, theta: MetaParams) -> Optimizer:
        """Returns the optimizer with meta-parameters `theta`."""
        tx = self._transformation()

        def init(params, num_steps) -> LearnedScheduleState:
            check_num_steps(num_steps)
            leaves = [p.astype(jnp.float32) for p in float_leaves(params)]
            return LearnedScheduleState(
                base=tx.init(leaves),
                leaf_sizes=jnp.asarray([p.size for p in leaves], jnp.int32),
                step=jnp.zeros((), jnp.int32),
                num_steps=jnp.asarray(num_steps, jnp.int32),
            )

        def update(grads, state: LearnedScheduleState, params, loss=None):
            del loss  # the schedule depends on progress only
            split = split_tree(grads, params, state.leaf_sizes.shape[0])
            # As in LearnedAdamLOpt: beyond ±MAX_GRAD a base's g² would overflow its state.
            clipped = [jnp.clip(g, -MAX_GRAD, MAX_GRAD) for g in split.grads]
            directions, base = tx.update(clipped, state.base, split.params)
            base = _keep_state_where_non_finite(base, state.base, split.finite)
            lr = self.learning_rate(theta, state.step, state.num_steps)
            updates = [lr * d for d in directions]
            new_state = LearnedScheduleState(
                base, state.leaf_sizes, state.step + 1, state.num_steps
            )
            return join_updates(split, updates), new_state

        return Optimizer(init, update)


@dataclasses.dataclass(frozen=True)
class LearnedScheduleLOpt(_LearnedSchedule):
    """A learned learning-rate schedule on top of an optax optimizer named in the config.

    The base optimizer (`BASE_OPTIMIZERS`, each with optax's defaults: 'adam' = `optax.adam`,
    'sgd' = `optax.sgd` with momentum 0.9, 'rmsprop', 'adamw' (weight decay 1e-4, scaled by
    the learning rate as in optax), 'lion' (weight decay 1e-3; Chen et al., "Symbolic
    discovery of optimization algorithms", 2023, advise a learning rate 3-10× below
    AdamW's)) runs at learning rate 1 and its update is multiplied by

        lr(t) = base_lr · exp(r · tanh(o(t) / r)) · s(t)

    where o(t) is a small MLP of the progress features (`lopt.common.progress_features`),
    r = `lr_range` and s(t) the fixed step schedule times the 1/t decay past the horizon
    (`lopt.base`). That is exactly the base optimizer with learning-rate schedule lr(t):
    θ = 0 and `init_meta` (zero output layer) give `optax.<base>(base_lr)`.

    Meta-parameters with the defaults: 161 ((8·16 + 16) + (16·1 + 1)); `num_meta_params`
    gives the count of any configuration. To put a learned schedule over any other optax
    transformation, use `OptaxScheduleLOpt` (Python only, not in configs).

    Non-finite gradient entries get a zero update; the base's per-parameter state (its
    moments) keeps its old entries there, its counters advance.

    Attributes:
      base_lr: the learning rate at θ = 0.
      hidden_size: width of the schedule network.
      hidden_layers: its number of hidden layers (0: linear in the features).
      lr_range: bound of the log learning-rate offset: lr ∈ base_lr · [e^-r, e^r].
      step_schedule: 'constant' or 'cosine': the fixed multiplier of the learning rate over
        the declared horizon (`lopt.base.step_schedule`).
      step_schedule_final: the cosine schedule's multiplier at the horizon, in [0, 1].
      base: the base optimizer, a key of `BASE_OPTIMIZERS`.
    """

    base: str = "adam"

    def __post_init__(self):
        problems = _validate_common(self)
        if self.base not in BASE_OPTIMIZERS:
            problems.append(f"base must be one of {sorted(BASE_OPTIMIZERS)}, got {self.base!r}")
        if problems:
            raise ValueError("LearnedScheduleLOpt: " + "; ".join(problems))

    def _transformation(self) -> optax.GradientTransformation:
        return BASE_OPTIMIZERS[self.base]()


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptaxScheduleLOpt(_LearnedSchedule):
    """`LearnedScheduleLOpt` over any optax transformation object, for Python users:

        lopt = OptaxScheduleLOpt(transformation=optax.adafactor(1.0), base_lr=1e-2)

    A transformation object is not JSON, so this optimizer cannot be named in a config,
    saved in a checkpoint's config or built by `lopt.registry.make_lopt`; keep the code that
    builds it next to the saved θ. The other options are `LearnedScheduleLOpt`'s.

    Attributes:
      transformation: an optax transformation returning updates in optax's sign convention
        (params + updates) at learning rate 1, e.g. `optax.adafactor(1.0)` or
        `optax.chain(optax.scale_by_adam(), optax.scale(-1.0))` (a bare `scale_by_*`
        returns the ascent direction: chain it with `optax.scale(-1.0)`). It gets the
        float leaves as a list of float32 arrays, and the params (for weight decay).
    """

    transformation: optax.GradientTransformation | None = None

    def __post_init__(self):
        problems = _validate_common(self)
        tx = self.transformation
        if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
            problems.append(f"transformation must be an optax transformation, got {tx!r}")
        if problems:
            raise ValueError("OptaxScheduleLOpt: " + "; ".join(problems))

    def _transformation(self) -> optax.GradientTransformation:
        return self.transformation
