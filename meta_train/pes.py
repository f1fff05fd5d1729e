"""Persistent Evolution Strategies (PES).

Vicol, Metz, Sohl-Dickstein, "Unbiased Gradient Estimation in Unrolled Computation Graphs
with Persistent Evolution Strategies", ICML 2021.

Every antithetic pair keeps two persistent inner states (run with θ+ε and θ−ε) and an
accumulator ξ of the perturbations applied since its episode began. Each window draws a new
ε, sets ξ ← ξ + ε, runs both members K steps and estimates
ĝ = (1/N) Σ_i (L_i⁺ − L_i⁻) ξ_i / (2σ²) with L the mean per-step loss of the window.
When a window crosses an episode end, the steps before the reset are weighted by ξ and the
steps after it by the current ε alone, and ξ restarts from the current ε. A pair with a
non-finite step in the window contributes zero (its members are reset).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from meta_train.unroll import EpisodeSchedule, Particle, WindowOut, init_group, unroll_window


class PESState(struct.PyTreeNode):
    """Per task group: the pairs' particles [pairs, 2, ...] and accumulators [pairs, ...]."""

    particles: tuple[Particle, ...]
    accum: tuple[Any, ...]


def _pair_thetas(theta: Any, eps: Any) -> Any:
    """[pairs, 2, ...]: θ+ε and θ−ε for every pair."""
    return jax.tree.map(lambda t, e: jnp.stack([t + e, t - e], axis=1), theta, eps)


def _normal_like(key: jax.Array, theta: Any, num: int, sigma: float) -> Any:
    leaves, treedef = jax.tree.flatten(theta)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            sigma * jax.random.normal(k, (num,) + x.shape, x.dtype)
            for k, x in zip(keys, leaves, strict=True)
        ],
    )


class PES(struct.PyTreeNode):
    """The PES estimator over one or more groups of persistent antithetic pairs.

    Attributes:
      problems: one inner problem per task group (pytrees: their data are jit arguments).
      schedule: window K and episode lengths.
      sigma: standard deviation of the perturbations.
      pairs_per_group: antithetic pairs in each group.
    """

    problems: tuple
    schedule: EpisodeSchedule = struct.field(pytree_node=False)
    sigma: float = struct.field(pytree_node=False)
    pairs_per_group: int = struct.field(pytree_node=False)

    def init(self, key: jax.Array, theta: Any) -> PESState:
        """Fresh, staggered particles and zero accumulators."""
        particles, accum = [], []
        zeros = jax.tree.map(lambda t: jnp.zeros((self.pairs_per_group,) + t.shape), theta)
        thetas = _pair_thetas(theta, zeros)
        for problem, k in zip(
            self.problems, jax.random.split(key, len(self.problems)), strict=True
        ):
            keys = jax.random.split(k, self.pairs_per_group)
            init = jax.vmap(init_group, in_axes=(None, 0, 0, None))
            particles.append(init(problem, thetas, keys, self.schedule))
            accum.append(zeros)
        return PESState(tuple(particles), tuple(accum))

    def _group(self, problem, theta, particles, accum, key):
        """One group's window: the sum of its pairs' estimates, new particles and ξ."""
        n = self.pairs_per_group
        k_eps, k_unroll = jax.random.split(key)
        eps = _normal_like(k_eps, theta, n, self.sigma)
        xi = jax.tree.map(jnp.add, accum, eps)
        unroll = jax.vmap(unroll_window, in_axes=(None, 0, 0, 0, None))
        keys = jax.random.split(k_unroll, n)
        particles, out = unroll(problem, _pair_thetas(theta, eps), particles, keys, self.schedule)
        # out.losses: [pairs, K, 2]; the mean-over-window objective, split at a reset.
        diff = (out.losses[..., 0] - out.losses[..., 1]) / self.schedule.window
        seg = jax.vmap(WindowOut.segment)(out)
        ok = jnp.all(out.finite, axis=(1, 2))
        before = jnp.where(ok, jnp.sum(jnp.where(seg == 0, diff, 0.0), axis=1), 0.0)
        after = jnp.where(ok, jnp.sum(jnp.where(seg > 0, diff, 0.0), axis=1), 0.0)
        scale = 1.0 / (2.0 * self.sigma**2)
        grad_sum = jax.tree.map(
            lambda x, e: scale * (_bcast(before, x) * x + _bcast(after, e) * e).sum(0), xi, eps
        )
        crossed = jnp.any(out.resets, axis=1)
        accum = jax.tree.map(lambda x, e: jnp.where(_bcast(crossed, x), e, x), xi, eps)
        stats = {
            "meta_loss": jnp.mean(out.losses),
            "resets": jnp.sum(out.resets),
            "diverged_pairs": jnp.sum(~ok),
        }
        return grad_sum, particles, accum, stats

    def estimate(
        self, state: PESState, theta: Any, key: jax.Array
    ) -> tuple[Any, PESState, dict[str, jax.Array]]:
        """One window of every pair: the meta-gradient estimate, new state and metrics."""
        results = [
            self._group(p, theta, state.particles[g], state.accum[g], jax.random.fold_in(key, g))
            for g, p in enumerate(self.problems)
        ]
        total = self.pairs_per_group * len(self.problems)
        grad = jax.tree.map(lambda *gs: sum(gs) / total, *[r[0] for r in results])
        stats = [r[3] for r in results]
        metrics = {
            "meta_loss": jnp.mean(jnp.stack([s["meta_loss"] for s in stats])),
            "resets": sum(s["resets"] for s in stats),
            "diverged_pairs": sum(s["diverged_pairs"] for s in stats),
        }
        new_state = PESState(tuple(r[1] for r in results), tuple(r[2] for r in results))
        return grad, new_state, metrics


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))
