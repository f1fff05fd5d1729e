"""The outer learner: one jitted function per outer step.

`outer_step` estimates the meta-gradient (vmap over particles, `lax.scan` over the window),
makes it finite, clips it and applies the outer optax optimizer (Adam), with the learner
state's buffers donated.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.flatten_util import ravel_pytree

from meta_train.jit import jit


class LearnerState(struct.PyTreeNode):
    """Everything a resumed run needs besides the config.

    Attributes:
      theta: meta-parameters.
      opt_state: outer optimizer state (of θ flattened to one vector).
      est_state: estimator state (persistent particles, accumulators).
      key: the run's PRNG key (raw uint32 key data).
      step: outer steps done.
      last_grad: the previous meta-gradient, flattened (for the consecutive-gradient cosine).
    """

    theta: Any
    opt_state: Any
    est_state: Any
    key: jax.Array
    step: jax.Array
    last_grad: Any


@functools.cache
def outer_optimizer(learning_rate: float, grad_clip: float) -> optax.GradientTransformation:
    """Adam on the meta-gradient after global-norm clipping.

    Cached, so runs with equal settings pass the identical (static) object to `outer_step`
    and share its compilation.
    """
    return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(learning_rate))


@jit(static_argnames=("outer_opt",))
def init_learner(estimator, theta: Any, outer_opt, key: jax.Array) -> LearnerState:
    """The learner's initial state: fresh staggered particles and outer optimizer state."""
    k_est, k_run = jax.random.split(key)
    return LearnerState(
        theta=theta,
        opt_state=outer_opt.init(ravel_pytree(theta)[0]),
        est_state=estimator.init(k_est, theta),
        key=k_run,
        step=jnp.zeros((), jnp.int32),
        last_grad=jnp.zeros_like(ravel_pytree(theta)[0]),
    )


@jit(static_argnames=("outer_opt",), donate_argnames=("state",))
def outer_step(estimator, state: LearnerState, outer_opt) -> tuple[LearnerState, dict]:
    """One outer step: estimate, sanitise, clip, update. Jitted; `state` is donated.

    The outer optimizer runs on θ flattened to one vector: one fused update instead of one
    per leaf (a smaller program, measured 0.4 s less to compile on one core).
    """
    key, k_est = jax.random.split(state.key)
    grad, est_state, metrics = estimator.estimate(state.est_state, state.theta, k_est)
    theta, unravel = ravel_pytree(state.theta)
    grad = ravel_pytree(grad)[0]
    # A non-finite estimate must never reach θ: drop it whole rather than nan_to_num parts.
    finite = jnp.all(jnp.isfinite(grad))
    grad = jnp.where(finite, grad, 0.0)
    updates, opt_state = outer_opt.update(grad, state.opt_state, theta)
    theta = unravel(theta + updates)
    norm = jnp.linalg.norm(grad)
    last_norm = jnp.linalg.norm(state.last_grad)
    cosine = jnp.vdot(grad, state.last_grad) / jnp.maximum(norm * last_norm, 1e-30)
    metrics = dict(metrics, grad_norm=norm, grad_finite=finite, grad_cosine=cosine)
    new = LearnerState(theta, opt_state, est_state, key, state.step + 1, grad)
    return new, metrics
