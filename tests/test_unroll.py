"""Truncated unrolls: episode boundaries, shared keys, staggering, divergence resets."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from meta_train.unroll import EpisodeSchedule, Particle, init_group, unroll_window


class Counter(struct.PyTreeNode):
    """inner = (steps since reset, a random draw at reset); loss = steps since reset."""

    def reset(self, theta, key, num_steps):
        return {"n": jnp.float32(0.0), "tag": jax.random.uniform(key), "T": num_steps}

    def step(self, theta, inner, key):
        n = inner["n"] + 1.0
        return dict(inner, n=n), n + 0.0 * theta, jnp.bool_(True)


class Blowup(struct.PyTreeNode):
    """Diverges (NaN) at its 3rd step for the member with theta > 0."""

    def reset(self, theta, key, num_steps):
        return jnp.float32(0.0)

    def step(self, theta, inner, key):
        s = inner + 1.0
        loss = jnp.where((s >= 3) & (theta > 0), jnp.nan, s)
        return s, jnp.nan_to_num(loss, nan=10.0), jnp.isfinite(loss)


def test_episode_boundaries_match_a_step_by_step_reference():
    sched = EpisodeSchedule(window=4, min_len=8, max_len=24)
    thetas = jnp.zeros((2,))
    p = init_group(Counter(), thetas, jax.random.PRNGKey(0), sched)
    # Reference: walk step by step with the lengths the particle reports.
    length, n = int(p.length[0]), 0
    for w in range(12):
        p, out = jax.jit(unroll_window, static_argnums=(4,))(
            Counter(), thetas, p, jax.random.PRNGKey(w + 1), sched
        )
        for t in range(4):
            n += 1
            assert out.losses[t, 0] == n  # a float32 count of +1.0 steps: exact integers
            if n >= length:
                assert out.resets[t]
                n = 0
                length = int(p.length[0])  # the new episode's sampled length
            else:
                assert not out.resets[t]
        assert int(p.step[0]) == n
        assert 8 <= length <= 24 and length % 4 == 0


def test_members_share_keys_and_reset_together():
    sched = EpisodeSchedule(window=5, min_len=5, max_len=10)
    thetas = jnp.array([1.0, -1.0])
    p = init_group(Counter(), thetas, jax.random.PRNGKey(3), sched)
    for w in range(6):
        p, out = unroll_window(Counter(), thetas, p, jax.random.PRNGKey(w), sched)
        # Same key, same draw; losses are exact integer counts: bit-identical by construction.
        np.testing.assert_array_equal(p.inner["tag"][0], p.inner["tag"][1])
        np.testing.assert_array_equal(out.losses[:, 0], out.losses[:, 1])


def test_first_episodes_are_staggered():
    sched = EpisodeSchedule(window=10, min_len=100, max_len=100)
    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    p = jax.vmap(init_group, in_axes=(None, None, 0, None))(Counter(), jnp.zeros((2,)), keys, sched)
    lengths = np.asarray(p.length[:, 0])
    assert set(np.unique(lengths)) <= set(range(10, 101, 10))
    assert len(np.unique(lengths)) >= 6  # spread over the episode, in whole windows


def test_divergence_resets_the_whole_group_and_is_flagged():
    sched = EpisodeSchedule(window=5, min_len=50, max_len=50)
    thetas = jnp.array([1.0, -1.0])
    p = Particle(jnp.zeros((2,)), jnp.zeros((2,), jnp.int32), jnp.full((2,), 50, jnp.int32))
    p, out = unroll_window(Blowup(), thetas, p, jax.random.PRNGKey(0), sched)
    finite = np.asarray(out.finite)
    assert not finite[2, 0] and finite[2, 1]
    assert out.resets[2] and not out.resets[1]
    # Both members restarted after step 3, then ran 2 more steps of the new episode.
    np.testing.assert_array_equal(p.inner, [2.0, 2.0])  # counts of +1.0: exact
    np.testing.assert_array_equal(p.step, [2, 2])
    np.testing.assert_array_equal(out.segment(), [0, 0, 0, 1, 1])
