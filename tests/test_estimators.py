"""PES: unbiased through the persistent state, resets, divergence masking."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from meta_train.estimators import (
    FullES,
    PersistentES,
    WindowObjective,
    flat_normal,
    make_estimator,
)
from meta_train.synthetic import DEFAULTS, run_estimator
from meta_train.unroll import EpisodeSchedule, WindowOut
from tasks.synthetic import InfluenceBalancing, LinearQuadratic, Toy2DRegression


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
    # Monte Carlo over 4,096 pairs: relative standard error ≈ sqrt(2/4096) ≈ 2 %, so 10 %.
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
    eps = np.asarray(flat_normal(k_eps, 64, 1, 0.1))[:, 0]  # [pairs, D=1]
    ok = np.abs(eps) <= 0.05
    assert int(m["diverged_pairs"]) == int((~ok).sum())
    # float32 sum over 64 pairs against float64: rtol=1e-4 covers the float32 rounding.
    np.testing.assert_allclose(float(g), np.sum(np.where(ok, eps**2, 0.0)) / 0.01 / 64, rtol=1e-4)


# --- The estimators against each other and against a step-by-step reference -------------


def _estimate(est, theta, keys, state=None):
    state = est.init(jax.random.PRNGKey(0), theta) if state is None else state
    step = jax.jit(lambda e, s, k: e.estimate(s, theta, k))
    grads = []
    for k in keys:
        g, state, _ = step(est, state, k)
        grads.append(np.asarray(g))
    return grads, state


def test_pes_with_window_equal_to_episode_is_full_es_in_float64():
    with jax.enable_x64(True):
        T, pairs = 20, 16
        sched = EpisodeSchedule(window=T, min_len=T, max_len=T)
        theta = jnp.array([0.3, -1.0], jnp.float64)
        pes = make_estimator(
            "pes",
            (Toy2DRegression(horizon=T),),
            sched,
            pairs_per_group=pairs,
            sigma=0.3,
            stagger="none",
        )
        full = make_estimator(
            "full_es", (Toy2DRegression(horizon=T),), sched, pairs_per_group=pairs, sigma=0.3
        )
        keys = [jax.random.PRNGKey(100 + i) for i in range(3)]
        g_pes, _ = _estimate(pes, theta, keys)
        g_full, _ = _estimate(full, theta, keys)
        assert g_pes[0].dtype == np.float64
        for a, b in zip(g_pes, g_full, strict=True):
            # float64, equal up to the order of the sums: 1e-10 is ~1e6 ulp of slack.
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
            assert np.abs(a).max() > 1e-3  # not trivially zero


def test_es_single_summed_over_an_episode_is_full_es_in_float64():
    with jax.enable_x64(True):
        T, K, pairs = 30, 5, 16
        theta = jnp.array([0.1, -0.5], jnp.float64)
        single = make_estimator(
            "es_single",
            (Toy2DRegression(horizon=T),),
            EpisodeSchedule(K, T, T),
            pairs_per_group=pairs,
            sigma=0.3,
            stagger="none",
        )
        full = make_estimator(
            "full_es",
            (Toy2DRegression(horizon=T),),
            EpisodeSchedule(T, T, T),
            pairs_per_group=pairs,
            sigma=0.3,
        )
        first = jax.random.PRNGKey(7)  # ε is drawn in the first window of the episode
        keys = [first] + [jax.random.PRNGKey(50 + i) for i in range(T // K - 1)]
        g_single, state = _estimate(single, theta, keys)
        (g_full,), _ = _estimate(full, theta, [first])
        # Mean-over-window objectives: Σ_k (1/K)Σ_{t∈k} = (T/K) · (1/T)Σ_t.
        # float64, equal up to summation order: rtol=1e-10.
        np.testing.assert_allclose(np.sum(g_single, axis=0) * K / T, g_full, rtol=1e-10)
        # The episode ended: the next window draws a new ε.
        assert int(state.particles[0].step[0, 0]) == 0


class Drift1(struct.PyTreeNode):
    """s ← 0.9 s + θ + 0.1; loss = s (deterministic, stateful): easy to replay by hand."""

    def reset(self, theta, key, num_steps):
        return jnp.zeros((), theta.dtype)

    def step(self, theta, s, key):
        s = 0.9 * s + theta + 0.1
        return s, s, jnp.bool_(True)


def test_pes_episode_boundaries_inside_windows_match_a_step_by_step_reference():
    with jax.enable_x64(True):
        T, K, pairs, sigma, windows = 7, 3, 5, 0.2, 9
        theta = jnp.float64(0.4)
        est = make_estimator(
            "pes",
            (Drift1(),),
            EpisodeSchedule(K, T, T, whole_windows=False),
            pairs_per_group=pairs,
            sigma=sigma,
            stagger="none",
        )
        state = est.init(jax.random.PRNGKey(0), theta)
        step = jax.jit(lambda s, k: est.estimate(s, theta, k))
        # Reference, one pair at a time, one step at a time.
        s = np.zeros((pairs, 2))
        xi = np.zeros(pairs)
        n = np.zeros(pairs, int)
        for w in range(windows):
            g, state, _ = step(state, jax.random.PRNGKey(w))
            eps = np.asarray(state.noise[0]).reshape(pairs)  # the ε this window used ([pairs, D=1])
            xi = xi + eps
            g_ref = np.zeros(pairs)
            for i in range(pairs):
                crossed, ran_after = False, False
                for _ in range(K):
                    th = np.array([theta + eps[i], theta - eps[i]])
                    s[i] = 0.9 * s[i] + th + 0.1
                    weight = eps[i] if crossed else xi[i]
                    ran_after = crossed
                    g_ref[i] += (s[i, 0] - s[i, 1]) / K * weight / (2 * sigma**2)
                    n[i] += 1
                    if n[i] == T:  # episode ends after this step: fresh state
                        s[i], n[i], crossed = 0.0, 0, True
                if crossed:  # ξ restarts from what the new episode has run with
                    xi[i] = eps[i] if ran_after else 0.0
            # float64 against a float64 loop: equal up to summation order.
            np.testing.assert_allclose(float(g), g_ref.mean(), rtol=1e-10, atol=1e-12)
            np.testing.assert_array_equal(np.asarray(state.particles[0].step[:, 0]), n)


def _influence(estimator, **kw):
    setting = dataclasses.replace(DEFAULTS["influence"], **kw)
    return float(np.ravel(run_estimator("influence", estimator, setting)["final_theta"])[0])


@pytest.mark.slow  # ~8 s; keeps the default stage under 10 minutes
def test_influence_balancing_with_the_published_settings():
    optimum = InfluenceBalancing().optimum
    assert optimum == pytest.approx(-1 / 6, rel=1e-12)  # a float64 formula of small integers
    # K=1, 1000 particles, σ=0.1, SGD lr 1e-4, 3000 iterations, θ₀=0.5. rel=0.01: the
    # stochastic outer loop ends within 1 % of θ* (the paper's criterion is convergence).
    assert _influence("pes") == pytest.approx(optimum, rel=0.01)
    assert _influence("es_single") == pytest.approx(optimum, rel=0.01)
    assert _influence("tes") > 1.0  # short-horizon bias: the wrong side
    assert _influence("tbptt") > 1.0
    # A window long enough to see the true sensitivity (deterministic: few particles do).
    assert _influence("tbptt", window=100, particles=2) == pytest.approx(optimum, rel=0.01)


def test_variance_grows_with_windows_for_pes_and_stays_flat_for_es_single():
    d, K, W, pairs, sigma = 4, 2, 6, 40_000, 0.1
    a = jnp.tile(jnp.array([[1.0, -0.5, 0.25, 2.0]]), (K * W, 1))  # the same g every window
    g2 = float(jnp.sum(a[0] ** 2))
    problem = LinearQuadratic(a, curvature=0.0)
    out = {}
    for name in ("pes", "es_single"):
        est = make_estimator(
            name,
            (problem,),
            EpisodeSchedule(K, K * W, K * W),
            pairs_per_group=pairs,
            sigma=sigma,
            stagger="none",
        )
        state = est.init(jax.random.PRNGKey(0), jnp.zeros((d,)))
        step = jax.jit(lambda e, s, k: e.estimate(s, jnp.zeros((d,)), k))
        out[name] = []
        for w in range(W):
            _, state, m = step(est, state, jax.random.PRNGKey(w))
            out[name].append(float(m["estimate_variance"]) / g2)
    k = np.arange(1, W + 1)
    # Theory (window k, one antithetic pair): ES-Single (d+1)|g|², PES [(d+1) + (k−1)d]|g|².
    # Monte Carlo with 40,000 pairs of a heavy-tailed product: 10 % tolerance.
    np.testing.assert_allclose(out["es_single"], (d + 1) * np.ones(W), rtol=0.1)
    np.testing.assert_allclose(out["pes"], (d + 1) + (k - 1) * d, rtol=0.1)


def test_objectives_sign_and_clip():
    out_losses = jnp.array([[1.0, 2.0], [3.0, 5.0], [4.0, 9.0]])
    out = WindowOut(
        out_losses,
        jnp.ones((3, 2), bool),
        jnp.array([False, True, False]),
        jnp.zeros((3, 2)).at[2].set(jnp.array([7.0, 8.0])),
    )
    before, after = WindowObjective("mean").split(out)
    # float32 weights 1/3 and sums of two products: a few ulp (rtol=1e-6).
    np.testing.assert_allclose(before, [(1 + 3) / 3, (2 + 5) / 3], rtol=1e-6)
    np.testing.assert_allclose(after, [4 / 3, 9 / 3], rtol=1e-6)
    # Weights 0 and 1 on small integers: every product and sum is exact in float32.
    before, after = WindowObjective("final").split(out)
    np.testing.assert_array_equal(before, [0, 0])
    np.testing.assert_array_equal(after, [4, 9])
    before, after = WindowObjective("valid_final").split(out)
    np.testing.assert_array_equal(before, [0, 0])
    np.testing.assert_array_equal(after, [7, 8])
    diffs = jnp.array([-3.0, 0.5, jnp.nan])
    # sign, clip and nan_to_num select exact values: no rounding.
    np.testing.assert_array_equal(WindowObjective(sign=True).transform(diffs), [-1, 1, 0])
    np.testing.assert_array_equal(WindowObjective(clip=1.0).transform(diffs), [-1, 0.5, 0])


def test_burn_in_staggers_particles_over_an_episode():
    sched = EpisodeSchedule(window=2, min_len=20, max_len=20)
    est = make_estimator(
        "pes", (Drift1(),), sched, pairs_per_group=64, sigma=0.1, stagger="burn_in"
    )
    state = est.init(jax.random.PRNGKey(0), jnp.float32(0.1))
    steps = np.asarray(state.particles[0].step[:, 0])
    lengths = np.asarray(state.particles[0].length[:, 0])
    assert (lengths == 20).all()  # real, untruncated episodes
    assert len(np.unique(steps)) >= 7 and steps.max() >= 14 and set(steps % 2) == {0}
    # Both members of every pair stay identical after burn-in (the same θ and keys through
    # the same elementwise computation: bit-identical by construction).
    np.testing.assert_array_equal(state.particles[0].inner[:, 0], state.particles[0].inner[:, 1])


def test_full_es_requires_whole_episodes():
    with pytest.raises(ValueError, match="full_es"):
        make_estimator(
            "full_es", (Drift1(),), EpisodeSchedule(2, 10, 10), pairs_per_group=2, sigma=0.1
        )
    assert isinstance(
        make_estimator(
            "full_es", (Drift1(),), EpisodeSchedule(10, 10, 10), pairs_per_group=2, sigma=0.1
        ),
        FullES,
    )


def _constant_gradient_problem(g: list[float], steps: int) -> LinearQuadratic:
    """Per-step loss g·θ at every step: the window objective's gradient is g exactly."""
    return LinearQuadratic(jnp.tile(jnp.asarray([g], jnp.float32), (steps, 1)))


def test_two_task_groups_average_over_all_pairs():
    K, T = 2, 8
    sched = EpisodeSchedule(K, T, T)
    theta = jnp.array([0.5, -0.25])
    groups = (_constant_gradient_problem([2.0, 0.0], T), _constant_gradient_problem([0.0, 2.0], T))
    # Averaging over every pair of both (equal-sized) groups gives the gradient (1, 1) and
    # the window objective (θ·g₀ + θ·g₁)/2 = 0.25; group 0 alone would give (2, 0) and 1,
    # group 1 alone (0, 2) and -0.5, a sum over groups (2, 2) and 0.5.
    expected_grad, expected_loss = np.array([1.0, 1.0]), 0.25

    # TBPTT: every particle's gradient is its group's g exactly.
    tbptt = make_estimator("tbptt", groups, sched, pairs_per_group=3, sigma=0.1, stagger="none")
    state = tbptt.init(jax.random.PRNGKey(0), theta)
    for w in range(2):
        g, state, m = jax.jit(tbptt.estimate)(state, theta, jax.random.PRNGKey(w))
        # Means of exactly representable values: float32 round-off only.
        np.testing.assert_allclose(np.asarray(g), expected_grad, rtol=1e-6)
        np.testing.assert_allclose(float(m["meta_loss"]), expected_loss, rtol=1e-6)

    # PES (first window, ξ = ε): each pair estimates (ε·g)ε/σ², whose mean is its group's g.
    pairs = 4096
    pes = make_estimator("pes", groups, sched, pairs_per_group=pairs, sigma=0.1, stagger="none")
    state = pes.init(jax.random.PRNGKey(0), theta)
    g, state, m = jax.jit(pes.estimate)(state, theta, jax.random.PRNGKey(1))
    # Per-pair variance ≤ 8 per coordinate, so the standard error over 2·4,096 pairs is
    # ≤ 0.03: 0.15 is 5 standard errors and far from the wrong answers (distance ≥ 1).
    np.testing.assert_allclose(np.asarray(g), expected_grad, atol=0.15)
    # The members' losses θ·g ± ε·g cancel ε per pair exactly up to float32 rounding of
    # values ~1 (a mean over 16,384 of them): rtol=1e-5.
    np.testing.assert_allclose(float(m["meta_loss"]), expected_loss, rtol=1e-5)
    assert len(state.particles) == 2 and int(m["diverged_pairs"]) == 0


@pytest.mark.parametrize("mode", ["es_single", "pes"])
def test_late_weight_scales_each_window_by_the_episode_progress_at_its_end(mode):
    with jax.enable_x64(True):
        T, K, p = 30, 5, 2.0
        theta = jnp.array([0.1, -0.5], jnp.float64)

        def estimator(late_weight):
            return make_estimator(
                mode,
                (Toy2DRegression(horizon=T),),
                EpisodeSchedule(K, T, T),
                pairs_per_group=8,
                sigma=0.3,
                objective=WindowObjective(late_weight=late_weight),
                stagger="none",
            )

        keys = [jax.random.PRNGKey(50 + i) for i in range(T // K + 1)]
        plain, _ = _estimate(estimator(0.0), theta, keys)
        late, _ = _estimate(estimator(p), theta, keys)
        # window i ends at step (i + 1)·K of the episode; the 7th starts a new one
        progress = [(i + 1) * K / T for i in range(T // K)] + [K / T]
        for g_plain, g_late, frac in zip(plain, late, progress, strict=True):
            np.testing.assert_allclose(g_late, frac**p * g_plain, rtol=1e-10)


def test_late_weight_must_be_finite_and_non_negative():
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="late_weight"):
            WindowObjective(late_weight=bad)
    with pytest.raises(ValueError, match="late_weight"):
        make_estimator(
            "tbptt",
            (Toy2DRegression(horizon=10),),
            EpisodeSchedule(5, 10, 10),
            pairs_per_group=2,
            sigma=0.1,
            objective=WindowObjective(late_weight=1.0),
        )
