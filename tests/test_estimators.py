"""PES: unbiased through the persistent state, resets, divergence masking."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from meta_train.estimators import PersistentES, normal_like
from meta_train.unroll import EpisodeSchedule


class Drift(struct.PyTreeNode):
    """s ← s + θ each step; loss = s. Window losses depend on every earlier θ."""

    def reset(self, theta, key, num_steps):
        return jnp.float32(0.0)

    def step(self, theta, inner, key):
        s = inner + theta
        return s, s, jnp.bool_(True)


class NaNAbove(struct.PyTreeNode):
    """Diverges whenever θ > 0.05 (one member of most pairs when θ≈0.05)."""

    def reset(self, theta, key, num_steps):
        return jnp.float32(0.0)

    def step(self, theta, inner, key):
        loss = jnp.where(theta > 0.05, jnp.nan, theta)
        return inner, jnp.nan_to_num(loss, nan=1.0), jnp.isfinite(loss)


def _run(est, theta, windows, key=0):
    state = est.init(jax.random.PRNGKey(key), theta)
    step = jax.jit(lambda e, s, k: e.estimate(s, theta, k))
    grads = []
    for w in range(windows):
        g, state, m = step(est, state, jax.random.PRNGKey(100 + w))
        grads.append(float(g))
    return grads, state, m


def test_pes_recovers_the_gradient_through_earlier_windows():
    # Episodes of exactly 2 windows of K=4, all particles in lockstep (first episode full).
    K, pairs = 4, 4096
    sched = EpisodeSchedule(window=K, min_len=2 * K, max_len=2 * K)
    est = PersistentES((Drift(),), sched, pairs, sigma=0.1)
    theta = jnp.float32(0.3)
    state = est.init(jax.random.PRNGKey(0), theta)
    # Force every particle to start a full 2-window episode.
    p = state.particles[0]
    state = state.replace(particles=(p.replace(length=jnp.full_like(p.length, 2 * K)),))
    step = jax.jit(lambda e, s, k: e.estimate(s, theta, k))
    g1, state, _ = step(est, state, jax.random.PRNGKey(1))
    g2, state, _ = step(est, state, jax.random.PRNGKey(2))
    # dL1/dθ = mean(1..K); dL2/dθ = mean(K+1..2K): the second needs the accumulator.
    np.testing.assert_allclose(float(g1), np.mean(np.arange(1, K + 1)), rtol=0.1)
    np.testing.assert_allclose(float(g2), np.mean(np.arange(K + 1, 2 * K + 1)), rtol=0.1)
    # After the episode ended the accumulator restarted: the third window is a first one.
    g3, state, _ = step(est, state, jax.random.PRNGKey(3))
    np.testing.assert_allclose(float(g3), np.mean(np.arange(1, K + 1)), rtol=0.1)


def test_diverging_pairs_contribute_nothing():
    sched = EpisodeSchedule(window=2, min_len=10, max_len=10)
    est = PersistentES((NaNAbove(),), sched, 64, sigma=0.1)
    theta = jnp.float32(0.0)
    state = est.init(jax.random.PRNGKey(0), theta)
    g, _, m = est.estimate(state, theta, jax.random.PRNGKey(1))
    assert np.isfinite(float(g))
    assert 0 < int(m["diverged_pairs"]) < 64
    # Reference: only pairs with |ε| <= 0.05 survive; each gives (2ε)·ε / (2σ²).
    k_eps, _ = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(1), 0))
    eps = np.asarray(normal_like(k_eps, theta, 64, 0.1))
    ok = np.abs(eps) <= 0.05
    assert int(m["diverged_pairs"]) == int((~ok).sum())
    np.testing.assert_allclose(float(g), np.sum(np.where(ok, eps**2, 0.0)) / 0.01 / 64, rtol=1e-4)
