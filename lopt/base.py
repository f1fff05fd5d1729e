"""The learned-optimizer interface: meta-parameters in, an ordinary optimizer out.

A learned optimizer is a pair of pure functions:

* `init_meta(key) -> theta`: fresh meta-parameters (a pytree);
* `optimizer(theta) -> Optimizer`: an optimizer whose `init(params, num_steps)` and
  `update(grads, state, params, loss) -> (updates, state)` are pure and traceable.

`lopt` knows nothing about tasks or estimators; the optax export in `lopt.export` is a thin
adapter over these same functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

MetaParams = Any
Params = Any
OptState = Any


class Optimizer(NamedTuple):
    """An inner optimizer built from meta-parameters.

    Attributes:
      init: `init(params, num_steps) -> state`; `num_steps` is the training horizon the
        progress features are measured against.
      update: `update(grads, state, params, loss) -> (updates, state)`; `params + updates`
        are the new parameters (optax convention).
    """

    init: Callable[[Params, Any], OptState]
    update: Callable[[Params, OptState, Params, jax.Array], tuple[Params, OptState]]


@runtime_checkable
class LearnedOptimizer(Protocol):
    """A family of optimizers indexed by meta-parameters."""

    def init_meta(self, key: jax.Array) -> MetaParams:
        """Returns freshly initialised meta-parameters."""

    def optimizer(self, theta: MetaParams) -> Optimizer:
        """Returns the optimizer with meta-parameters `theta`."""


def past_horizon_decay(step: jax.Array, num_steps: jax.Array) -> jax.Array:
    """Update scale for training on past the declared horizon: 1 up to `num_steps`, then
    `num_steps / step`.

    A learned optimizer's progress features end at the horizon; saturating them repeats the
    last step's behaviour indefinitely, which it was never trained for. Decaying the step as
    1/t from there (the Robbins-Monro schedule) continues the end-of-training annealing: a
    user who trains longer than declared keeps converging instead of drifting. Inside the
    horizon the optimizer is unchanged.

    Args:
      step: steps taken before this update (int).
      num_steps: the declared horizon (int).

    Returns:
      A float32 scalar in (0, 1].
    """
    num = jnp.maximum(num_steps.astype(jnp.float32), 1.0)
    return jnp.minimum(1.0, num / jnp.maximum(step.astype(jnp.float32), 1.0))


STEP_SCHEDULES = ("constant", "cosine")


def step_schedule_problems(lopt: Any) -> list[str]:
    """What is wrong with `lopt.step_schedule` and `lopt.step_schedule_final` (the options
    every kind of the zoo shares), as messages for its `__post_init__`."""
    problems = []
    if lopt.step_schedule not in STEP_SCHEDULES:
        problems.append(
            f"step_schedule must be one of {STEP_SCHEDULES}, got {lopt.step_schedule!r}"
        )
    final = lopt.step_schedule_final
    if isinstance(final, bool) or not isinstance(final, int | float) or not 0 <= final <= 1:
        problems.append(f"step_schedule_final must be in [0, 1], got {final!r}")
    return problems


def step_schedule(
    kind: str, step: jax.Array, num_steps: jax.Array, final: float = 0.0
) -> jax.Array:
    """A fixed step-size multiplier over the declared horizon, on top of the learned update.

    'cosine' decays from 1 at step 0 to `final` at `num_steps` (Loshchilov and Hutter, "SGDR",
    ICLR 2017) and stays there: a learned optimizer meta-trained with truncated windows gets
    no reliable signal to anneal by itself (measured in the README: without it the learned
    update keeps its early size and training plateaus at its noise floor on 2,000-step tasks),
    so annealing is built in and the network learns the update around it. 'constant' is 1.

    Args:
      kind: one of `STEP_SCHEDULES`.
      step: steps taken before this update (int).
      num_steps: the declared horizon (int).
      final: the multiplier at and past the horizon, in [0, 1].

    Returns:
      A float32 scalar.
    """
    if kind == "constant":
        return jnp.float32(1.0)
    if kind != "cosine":
        raise ValueError(f"unknown step schedule {kind!r}; known: {STEP_SCHEDULES}")
    num = jnp.maximum(num_steps.astype(jnp.float32), 1.0)
    frac = jnp.minimum(step.astype(jnp.float32), num) / num
    return final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


def step_scale(lopt: Any, step: jax.Array, num_steps: jax.Array, mult: Any = 1.0) -> jax.Array:
    """`mult` × the fixed schedule of `lopt` (`step_schedule` with its `step_schedule` and
    `step_schedule_final` options) × `past_horizon_decay`: the step-size multiplier every
    kind of the zoo applies on top of what it learned."""
    return (
        mult
        * step_schedule(lopt.step_schedule, step, num_steps, lopt.step_schedule_final)
        * past_horizon_decay(step, num_steps)
    )


def check_num_steps(num_steps: Any) -> None:
    """Rejects a declared horizon below 1 where it is known at trace time.

    Every kind's `init(params, num_steps)` calls it: a horizon of 0 or -1 would otherwise
    be clamped to 1 inside the schedules and train with the progress features of a 1-step
    run, silently. A traced horizon (meta-training samples horizons inside `jit`) is not
    checked here; the schedules clamp it.

    Args:
      num_steps: the declared training horizon: an int, a NumPy or JAX integer scalar, or
        a tracer.

    Raises:
      ValueError: for a concrete horizon below 1, or a non-integer one.
    """
    if isinstance(num_steps, jax.core.Tracer):
        return
    value = np.asarray(num_steps)
    if value.shape != () or not (
        np.issubdtype(value.dtype, np.integer)
        or (np.issubdtype(value.dtype, np.floating) and float(value).is_integer())
    ):
        raise ValueError(
            f"num_steps must be an integer >= 1 (the training horizon), got {num_steps!r}"
        )
    if int(value) < 1:
        raise ValueError(
            f"num_steps must be >= 1 (the number of steps you will train for), got {int(value)}"
        )
