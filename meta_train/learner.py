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

from meta_train.jit import jit
from meta_train.unroll import all_finite


class LearnerState(struct.PyTreeNode):
    """Everything a resumed run needs besides the config.

    Attributes:
      theta: meta-parameters.
      opt_state: outer optimizer state.
      est_state: estimator state (persistent particles, accumulators).
      key: the run's PRNG key (raw uint32 key data).
      step: outer steps done.
      last_grad: the previous meta-gradient (for the consecutive-gradient cosine).
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
        opt_state=outer_opt.init(theta),
        est_state=estimator.init(k_est, theta),
        key=k_run,
        step=jnp.zeros((), jnp.int32),
        last_grad=jax.tree.map(jnp.zeros_like, theta),
    )


@jit(static_argnames=("outer_opt",), donate_argnames=("state",))
def outer_step(estimator, state: LearnerState, outer_opt) -> tuple[LearnerState, dict]:
    """One outer step: estimate, sanitise, clip, update. Jitted; `state` is donated."""
    key, k_est = jax.random.split(state.key)
    grad, est_state, metrics = estimator.estimate(state.est_state, state.theta, k_est)
    # A non-finite estimate must never reach θ: drop it whole rather than nan_to_num parts.
    finite = all_finite(grad)
    grad = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grad)
    updates, opt_state = outer_opt.update(grad, state.opt_state, state.theta)
    theta = optax.apply_updates(state.theta, updates)
    norm = optax.global_norm(grad)
    dot = sum(
        jnp.vdot(a, b)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(state.last_grad), strict=True)
    )
    cosine = dot / jnp.maximum(norm * optax.global_norm(state.last_grad), 1e-30)
    metrics = dict(metrics, grad_norm=norm, grad_finite=finite, grad_cosine=cosine)
    new = LearnerState(theta, opt_state, est_state, key, state.step + 1, grad)
    return new, metrics
