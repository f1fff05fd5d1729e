"""Synthetic unrolled systems with known answers, for studying outer-gradient estimators.

They implement the same inner-problem interface as learned-optimizer training
(`reset(theta, key, num_steps)`, `step(theta, inner, key) -> (inner, loss, finite)`,
`eval_loss(theta, inner, key)`), so estimators treat them like any other problem. Each also
has `meta_objective(theta)`: the quantity the papers report, computed by a full unroll.

* `InfluenceBalancing`: Vicol, Metz, Sohl-Dickstein, ICML 2021, section 5.1. Short windows
  see ∂loss/∂θ with the wrong sign; the optimum is θ* = −1/6.
* `Toy2DRegression`: the same paper, section 5.2: a learning-rate schedule for SGD on a 2-D
  function whose meta-loss surface is chaotic.
* `LinearQuadratic`: per-step losses a_t·θ + ½ c‖θ‖², with no memory: every window's
  gradient is independent of the past, the setting where PES's variance grows with the
  number of windows and ES-Single's does not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


def _finite(*xs: jax.Array) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))


class InfluenceBalancing(struct.PyTreeNode):
    """s ← A s + θ c with A = ½(I + superdiagonal ones), c = (+1 ×n_pos, −1 ×rest).

    The loss ½(s[0] − 1)² is taken after every step; the system starts from ones and is
    never reset (use an episode length longer than the run). With the defaults the
    steady state is s[0] = −6θ, so the long-run optimum is θ* = −1/6.

    Attributes:
      dim: state size (23 in the paper).
      num_positive: leading entries of c equal to +1 (10 in the paper).
      eval_steps: length of the evaluation unroll of `meta_objective` (500 in the paper).
    """

    dim: int = struct.field(pytree_node=False, default=23)
    num_positive: int = struct.field(pytree_node=False, default=10)
    eval_steps: int = struct.field(pytree_node=False, default=500)

    @property
    def optimum(self) -> float:
        # s_i = s_{i+1} + 2θc_i and s_last = 2θc_last at steady state: s_0 = 2θ Σ c.
        return 1.0 / (2.0 * (2 * self.num_positive - self.dim))

    def _c(self, dtype) -> jax.Array:
        return jnp.where(jnp.arange(self.dim) < self.num_positive, 1.0, -1.0).astype(dtype)

    def _advance(self, theta: jax.Array, s: jax.Array) -> jax.Array:
        shifted = jnp.concatenate([s[1:], jnp.zeros((1,), s.dtype)])
        return 0.5 * s + 0.5 * shifted + theta * self._c(s.dtype)

    def reset(self, theta: jax.Array, key: jax.Array, num_steps: jax.Array) -> jax.Array:
        del key, num_steps
        return jnp.ones((self.dim,), jnp.asarray(theta).dtype)

    def step(self, theta: jax.Array, s: jax.Array, key: jax.Array):
        del key
        s = self._advance(theta, s)
        loss = 0.5 * (s[0] - 1.0) ** 2
        return s, loss, _finite(s, loss)

    def eval_loss(self, theta: jax.Array, s: jax.Array, key: jax.Array) -> jax.Array:
        del theta, key
        return 0.5 * (s[0] - 1.0) ** 2

    def meta_objective(self, theta: jax.Array) -> jax.Array:
        """The loss after an `eval_steps`-step unroll from ones."""
        s = jax.lax.fori_loop(
            0,
            self.eval_steps,
            lambda _, s: self._advance(theta, s),
            self.reset(theta, None, None),
        )
        return 0.5 * (s[0] - 1.0) ** 2


def toy_loss(x: jax.Array) -> jax.Array:
    """f(x) = sqrt(x₀² + 5) − sqrt(5) + sin²(x₁)·exp(−5x₀²) + 0.25|x₁ − 100|."""
    return (
        jnp.sqrt(x[0] ** 2 + 5.0)
        - jnp.sqrt(5.0)
        + jnp.sin(x[1]) ** 2 * jnp.exp(-5.0 * x[0] ** 2)
        + 0.25 * jnp.abs(x[1] - 100.0)
    )


class ToyState(struct.PyTreeNode):
    x: jax.Array
    t: jax.Array
    horizon: jax.Array


class Toy2DRegression(struct.PyTreeNode):
    """Inner SGD on `toy_loss` from x = (1, 1) with lr_t = e^θ₀ (T−t)/T + e^θ₁ t/T.

    The per-step loss is f after the step; the paper's meta-objective is the sum of f over
    the T steps of an episode (the paper: 2488 at θ = (−4, −4), about 553 at its grid
    minimum; the first is checked in tests/test_synthetic.py).

    Attributes:
      horizon: T for `meta_objective` (episodes in meta-training take their length from
        the schedule).
    """

    horizon: int = struct.field(pytree_node=False, default=100)

    def reset(self, theta: jax.Array, key: jax.Array, num_steps: jax.Array) -> ToyState:
        del key
        dtype = jnp.asarray(theta).dtype
        return ToyState(jnp.ones((2,), dtype), jnp.zeros((), dtype), jnp.asarray(num_steps, dtype))

    def step(self, theta: jax.Array, state: ToyState, key: jax.Array):
        del key
        frac = state.t / state.horizon
        lr = jnp.exp(theta[0]) * (1.0 - frac) + jnp.exp(theta[1]) * frac
        x = state.x - lr * jax.grad(toy_loss)(state.x)
        loss = toy_loss(x)
        return ToyState(x, state.t + 1, state.horizon), loss, _finite(x, loss)

    def eval_loss(self, theta: jax.Array, state: ToyState, key: jax.Array) -> jax.Array:
        del theta, key
        return toy_loss(state.x)

    def meta_objective(self, theta: jax.Array) -> jax.Array:
        """Sum of f after each of the T inner steps from x = (1, 1)."""

        def body(state, _):
            state, loss, _ = self.step(theta, state, None)
            return state, loss

        _, losses = jax.lax.scan(
            body, self.reset(theta, None, self.horizon), None, length=self.horizon
        )
        return jnp.sum(losses)


class LinearQuadratic(struct.PyTreeNode):
    """Memoryless per-step losses a_t·θ + ½·curvature·‖θ‖² (t counts from the episode start).

    With curvature 0 every window's loss is linear in θ and independent of earlier windows:
    the setting of the variance analysis (ES-Single: (d+1)|g|² per window; PES: grows
    linearly with the window index). With curvature > 0 the optimum is
    θ* = −mean_t(a_t) / curvature.

    Attributes:
      a: [T, d] per-step linear coefficients (a pytree leaf).
      curvature: the quadratic coefficient c.
    """

    a: jax.Array
    curvature: float = struct.field(pytree_node=False, default=0.0)

    @classmethod
    def random(cls, key: jax.Array, horizon: int, dim: int, curvature: float = 0.0):
        return cls(jax.random.normal(key, (horizon, dim)), curvature)

    def reset(self, theta: jax.Array, key: jax.Array, num_steps: jax.Array) -> jax.Array:
        del theta, key, num_steps
        return jnp.zeros((), jnp.int32)

    def _loss(self, theta: jax.Array, t: jax.Array) -> jax.Array:
        a = self.a[t % self.a.shape[0]].astype(theta.dtype)
        return jnp.dot(a, theta) + 0.5 * self.curvature * jnp.sum(theta**2)

    def step(self, theta: jax.Array, t: jax.Array, key: jax.Array):
        del key
        loss = self._loss(theta, t)
        return t + 1, loss, jnp.isfinite(loss)

    def eval_loss(self, theta: jax.Array, t: jax.Array, key: jax.Array) -> jax.Array:
        del key
        return self._loss(theta, t)

    def meta_objective(self, theta: jax.Array) -> jax.Array:
        """Mean per-step loss over one episode of T = len(a) steps."""
        return jnp.mean(jax.vmap(lambda t: self._loss(theta, t))(jnp.arange(self.a.shape[0])))

    @property
    def optimum(self) -> jax.Array:
        return -jnp.mean(self.a, axis=0) / self.curvature
