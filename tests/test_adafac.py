"""Tests of the AdaFac learned optimizer (per-parameter MLP with factored second moments)."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from lopt_cases import EPS, MODEL_TREES, TANH_SCALES, perturbed_theta, reference_network_update

import lopt.adafac as adafac
from lopt.adafac import AdaFacLOpt, AdaFacLOptState, matrix_shape
from lopt.export import as_optax


def _expected_count(hidden: int, layers: int, n_mom: int, n_rms: int) -> int:
    """(F + n_shared)·h + h + (h·h + h)·(layers − 1) + 2h + 2, F = 2 + 2K + 2R + 2."""
    n_per_param = 2 + 2 * n_mom + 2 * n_rms + 2
    n_shared = 3 + len(TANH_SCALES)
    return (
        (n_per_param + n_shared) * hidden
        + hidden
        + (hidden * hidden + hidden) * (layers - 1)
        + 2 * hidden
        + 2
    )


def _count(theta) -> int:
    return sum(x.size for x in jax.tree.leaves(theta))


def test_meta_parameter_count_matches_the_formula_and_the_docstring():
    lopt = AdaFacLOpt()
    assert _expected_count(4, 2, 3, 3) == 130
    assert _count(lopt.init_meta(jax.random.PRNGKey(0))) == lopt.num_meta_params == 130
    assert "(16 + 8)·4 + 4 + 20 + 10 = 130" in adafac.__doc__
    assert _expected_count(8, 2, 3, 3) == 290  # the default before issue 22
    other = AdaFacLOpt(
        hidden_size=32, hidden_layers=3, momentum_decays=(0.9,), rms_decays=(0.5, 0.9)
    )
    assert _count(other.init_meta(jax.random.PRNGKey(0))) == other.num_meta_params
    assert other.num_meta_params == _expected_count(32, 3, 1, 2)


def _reference_update(lopt, theta, p, g, m, r, c, step, num_steps):
    """The documented update of one tensor in float64 NumPy, written from the docstring.

    Args:
      p, g: the tensor and its gradient (float64, any shape).
      m: momenta [K, *shape]; r, c: row and column accumulators [R, a] and [R, b].

    Returns:
      The update and the new m, r, c.
    """
    if p.ndim < 2:  # a scalar or a vector is one row
        a, b = 1, p.size
    else:  # all axes but the last are rows: [h, w, in, out] -> [h*w*in, out]
        a, b = p.size // p.shape[-1], p.shape[-1]
    mu = np.asarray(lopt.momentum_decays)
    beta = np.asarray(lopt.rms_decays)[:, None]
    m = mu.reshape((-1,) + (1,) * p.ndim) * m + (1 - mu.reshape((-1,) + (1,) * p.ndim)) * g
    g2 = g.reshape(a, b) ** 2
    r = beta * r + (1 - beta) * g2.mean(axis=1)
    c = beta * c + (1 - beta) * g2.mean(axis=0)
    ratio = r / r.mean(axis=1, keepdims=True)  # r_i / mean(r); v_ij = ratio_i c_j
    rms = np.sqrt(ratio)[:, :, None] * np.sqrt(c)[:, None, :]  # [R, a, b]
    u = 1 / np.sqrt(ratio + EPS)[:, :, None] / np.sqrt(c + EPS)[:, None, :]
    slow = int(np.argmax(lopt.rms_decays))
    mm, gg = m.reshape(-1, a, b), g.reshape(a, b)
    columns = (
        [p.reshape(a, b), gg, *mm, *rms]
        + [mk * u[slow] for mk in mm]
        + [gg * ur for ur in u]
        + [np.broadcast_to(1 / np.sqrt(r[slow] + EPS)[:, None], (a, b))]
        + [np.broadcast_to(1 / np.sqrt(c[slow] + EPS)[None, :], (a, b))]
    )
    u = reference_network_update(lopt, theta, columns, step, num_steps)
    return u.reshape(p.shape), m, r, c


# A matrix, a wide matrix, a vector, a scalar and a conv kernel [h, w, in, out].
SHAPES = {"a": (5, 4), "b": (2, 20), "c": (4,), "d": (), "e": (2, 2, 3, 4)}


@pytest.mark.parametrize(
    "lopt, num_steps, block",
    [
        (AdaFacLOpt(), 10, 8192),
        (AdaFacLOpt(), 10, 8),
        (
            AdaFacLOpt(
                hidden_size=6,
                hidden_layers=1,
                momentum_decays=(0.5, 0.95),
                rms_decays=(0.999, 0.5),
                step_mult=0.01,
                exp_mult=0.5,
            ),
            2,  # steps 2 and 3 are past the horizon
            8,
        ),
        (AdaFacLOpt(hidden_layers=3, step_schedule="cosine", step_schedule_final=0.2), 6, 8192),
    ],
    ids=["default", "default-blocked", "1-layer-past-horizon-blocked", "3-layers-cosine"],
)
def test_updates_match_an_independent_float64_reference(lopt, num_steps, block, monkeypatch):
    # With 8-parameter blocks every tensor of 8 entries or more runs through the loop in
    # tiles: the [5, 4] matrix in 2-row tiles (the last overlapping), the [2, 20] one in
    # single rows split into 7-column pieces, the conv kernel ([12, 4]) in 2-row tiles.
    monkeypatch.setattr(adafac, "_BLOCK", block)
    theta = perturbed_theta(lopt)
    rng = np.random.default_rng(0)
    opt = lopt.optimizer(theta)
    update = jax.jit(opt.update)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    state = opt.init(params, num_steps)
    n_mom, n_rms = len(lopt.momentum_decays), len(lopt.rms_decays)
    ref = {}
    for k, s in SHAPES.items():
        a, b = matrix_shape(s)
        ref[k] = (np.zeros((n_mom,) + s), np.zeros((n_rms, a)), np.zeros((n_rms, b)))
    keys = sorted(SHAPES)  # dict leaves come out in sorted key order
    for step in range(4):
        params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
        grads = {k: (2.0 * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}
        updates, state = update(grads, state, params, jnp.float32(1.0))
        for i, k in enumerate(keys):
            expected, *ref[k] = _reference_update(
                lopt, theta, np.float64(params[k]), np.float64(grads[k]), *ref[k], step, num_steps
            )
            got = np.asarray(updates[k])
            assert got.dtype == np.float32 and got.shape == SHAPES[k]
            # float32 features and small matmuls: errors of a few 1e-7 of the tensor's
            # update scale (measured ≤ 5e-7); 1e-5 of that scale leaves a 20x margin.
            scale = np.abs(expected).max()
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale, err_msg=k)
            # The state: float32 decays (1 - float32(0.999) is 1.3e-5 off 0.001, relative).
            new_state = (state.momenta[i], state.rows[i], state.cols[i])
            for new, want in zip(new_state, ref[k], strict=True):
                np.testing.assert_allclose(new, want, rtol=3e-5, atol=1e-12, err_msg=k)
    assert int(state.step) == 4


def test_factored_state_is_rows_plus_columns_per_matrix():
    params = {"w": jnp.ones((300, 200)), "conv": jnp.ones((3, 3, 16, 32)), "b": jnp.ones(200)}
    lopt = AdaFacLOpt()
    state = lopt.optimizer(lopt.init_meta(jax.random.PRNGKey(0))).init(params, 100)
    assert isinstance(state, AdaFacLOptState)
    b, conv, w = 0, 1, 2  # sorted keys
    assert state.rows[w].shape == (3, 300) and state.cols[w].shape == (3, 200)
    assert state.rows[conv].shape == (3, 144) and state.cols[conv].shape == (3, 32)
    # A vector is a single row: its column accumulators are a full second moment.
    assert state.rows[b].shape == (3, 1) and state.cols[b].shape == (3, 200)
    assert state.momenta[w].shape == (3, 300, 200)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state)[:-2])
    # 4·K bytes per parameter of momenta plus 4·R·(a + b) of accumulators: 12 bytes per
    # parameter and 1.2 % more for the [300, 200] matrix (Adam: 8; a full accumulator at
    # each of the R decays would add 12 more).
    assert lopt.state_bytes((300, 200)) == 4 * (3 * 60_000 + 3 * 500)
    nbytes = {k: sum(x[i].nbytes for x in state[:3]) for i, k in enumerate(sorted(params))}
    assert nbytes == {k: lopt.state_bytes(p.shape) for k, p in params.items()}
    assert lopt.state_bytes((300, 200)) / 60_000 == pytest.approx(12.1)


def test_factored_estimate_is_exact_for_a_rank_one_square():
    # v_ij = r_i c_j / mean(r) is the running mean of g² when g² is an outer product.
    x, y = np.linspace(0.5, 2.0, 6), np.linspace(-1.0, 3.0, 5)
    params = {"w": jnp.zeros((6, 5))}
    lopt = AdaFacLOpt()
    opt = lopt.optimizer(lopt.init_meta(jax.random.PRNGKey(0)))
    update = jax.jit(opt.update)
    state = opt.init(params, 10)
    mean_sq = np.zeros((3, 6, 5))
    for t in range(3):
        g = (1 + t) * np.outer(x, y)
        _, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params, 1.0)
        beta = np.asarray(lopt.rms_decays)[:, None, None]
        mean_sq = beta * mean_sq + (1 - beta) * g**2
    r, c = np.float64(state.rows[0]), np.float64(state.cols[0])
    v = r[:, :, None] * c[:, None, :] / r.mean(axis=1)[:, None, None]
    # float32 decays: 1 - float32(0.999) is 1.3e-5 off 0.001, relative.
    np.testing.assert_allclose(v, mean_sq, rtol=3e-5)


class _ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("make_params", MODEL_TREES)
def test_fresh_optimizer_takes_small_finite_steps_on_nested_pytrees(make_params):
    params = {"model": make_params(), "counters": {"seen": jnp.int32(5)}}
    lopt = AdaFacLOpt()
    opt = lopt.optimizer(lopt.init_meta(jax.random.PRNGKey(1)))
    state = opt.init(params, 100)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 3.0, params)
    updates, state = jax.jit(opt.update)(grads, state, params, jnp.float32(1.0))
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert u.shape == p.shape and u.dtype == p.dtype
        assert np.all(np.isfinite(u))
    assert int(updates["counters"]["seen"]) == 0
    # step_mult * d * exp(exp_mult * m) with O(1) outputs: about 1e-3 per parameter.
    floats = jax.tree.leaves(updates["model"])
    assert all(0 < np.abs(u).max() < 2e-2 for u in floats)
    new = optax.apply_updates(params, updates)
    assert int(new["counters"]["seen"]) == 5
    assert int(state.step) == 1


def test_bfloat16_params_get_the_float32_update_cast_once():
    dtype = jnp.bfloat16
    lopt = AdaFacLOpt()
    opt = lopt.optimizer(perturbed_theta(lopt))
    rng = np.random.default_rng(0)
    p32 = {"kernel": rng.normal(size=(32, 40)).astype(np.float32), "bias": np.zeros(40, np.float32)}
    g32 = {k: (300.0 * rng.normal(size=v.shape)).astype(np.float32) for k, v in p32.items()}
    low = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)  # noqa: E731
    p, g = low(p32), low(g32)
    update = jax.jit(opt.update)
    updates, state = update(g, opt.init(p, 100), p, jnp.float32(1.0))
    # The reference: the same (rounded) numbers in float32 throughout, cast at the end.
    up32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
    ref, ref_state = update(up32(g), opt.init(up32(p), 100), up32(p), jnp.float32(1.0))
    for k in p32:
        assert updates[k].dtype == dtype
        assert np.all(np.isfinite(np.asarray(updates[k], np.float32)))
        np.testing.assert_array_equal(updates[k], ref[k].astype(dtype))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


# A small tree (one matmul) and a 100 x 10 matrix, which runs through the blocked loop.
@pytest.mark.parametrize("rows", [6, 1000])
def test_zero_tiny_and_huge_gradients_give_finite_updates_and_state(rows):
    lopt = AdaFacLOpt()
    opt = lopt.optimizer(perturbed_theta(lopt))
    params = {"w": jnp.linspace(-1.0, 1.0, rows * 10).reshape(rows, 10), "b": jnp.ones(10)}
    update = jax.jit(opt.update)
    waves = [
        jax.tree.map(lambda p: jnp.sin(jnp.arange(p.size)).reshape(p.shape), params),
        jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size)).reshape(p.shape), params),
    ]
    for scale in (0.0, 1e-30, 1e-6, 1e20, 1e30, 3e38):
        state = opt.init(params, 100)
        for wave in waves * 2:
            g = jax.tree.map(lambda x: scale * x, wave)  # noqa: B023
            updates, state = update(g, state, params, jnp.float32(1.0))
            for u in jax.tree.leaves(updates):
                assert np.all(np.isfinite(u)), scale
                assert np.abs(u).max() < 1.0, scale  # a step, not an explosion
            assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state)), scale
        if scale >= 1e20:  # squares are capped, not infinite
            assert 0 < float(np.max(state.cols[1])) <= 1e38


def test_non_finite_entries_get_zero_update_and_stay_out_of_the_state():
    lopt = AdaFacLOpt()
    opt = lopt.optimizer(perturbed_theta(lopt))
    rng = np.random.default_rng(1)
    params = {"w": rng.normal(size=(4, 5)).astype(np.float32), "b": np.zeros(5, np.float32)}
    good = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    state = opt.init(params, 50)
    update = jax.jit(opt.update)
    _, state = update(good, state, params, jnp.float32(1.0))
    bad = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    bad["w"][1, 2], bad["w"][3, 0], bad["b"][4] = np.nan, np.inf, -np.inf
    bad["w"][2, :] = np.nan  # a row without any finite entry
    updates, new = update(bad, state, params, jnp.float32(1.0))
    mask = {k: ~np.isfinite(v) for k, v in bad.items()}
    for i, k in enumerate(sorted(params)):
        assert np.all(np.isfinite(updates[k]))
        assert np.all(updates[k][mask[k]] == 0.0) and np.all(updates[k][~mask[k]] != 0.0)
        # Momenta: untouched where masked, the usual running mean elsewhere.
        m_old, m_new = np.asarray(state.momenta[i]), np.asarray(new.momenta[i])
        np.testing.assert_array_equal(m_new[:, mask[k]], m_old[:, mask[k]])
        d = np.asarray(lopt.momentum_decays)[:, None]
        np.testing.assert_allclose(
            m_new[:, ~mask[k]], d * m_old[:, ~mask[k]] + (1 - d) * bad[k][~mask[k]], rtol=1e-5
        )
        # Accumulators: the mean square over the finite entries of each row (column); a
        # row (column) with none keeps its accumulators.
        g = np.where(mask[k], 0.0, np.float64(bad[k])).reshape(matrix_shape(bad[k].shape))
        fin = ~mask[k].reshape(g.shape)
        beta = np.asarray(lopt.rms_decays)[:, None]
        for axis, old, got in ((1, state.rows[i], new.rows[i]), (0, state.cols[i], new.cols[i])):
            count = fin.sum(axis=axis)
            mean = (g**2).sum(axis=axis) / np.maximum(count, 1)
            want = np.where(count > 0, beta * np.asarray(old) + (1 - beta) * mean, old)
            # float32 decays: 1 - float32(0.999) is 1.3e-5 off 0.001, relative.
            np.testing.assert_allclose(got, want, rtol=3e-5, err_msg=f"{k} axis {axis}")
    np.testing.assert_array_equal(new.rows[1][:, 2], state.rows[1][:, 2])  # the NaN row
    # The optimizer recovers: later finite gradients give finite non-zero updates.
    updates, _ = update(good, new, params, jnp.float32(1.0))
    assert all(np.all(np.isfinite(u)) and np.all(u != 0) for u in jax.tree.leaves(updates))


def test_float0_integer_and_empty_leaves_pass_through():
    lopt = AdaFacLOpt()
    opt = lopt.optimizer(lopt.init_meta(jax.random.PRNGKey(0)))
    params = {"w": jnp.ones((2, 3)), "n": jnp.int32(3), "empty": jnp.ones((0, 4))}
    grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2) * p["n"], allow_int=True)(params)
    assert grads["n"].dtype == jax.dtypes.float0
    updates, state = jax.jit(opt.update)(grads, opt.init(params, 10), params, jnp.float32(1.0))
    assert updates["n"].dtype == jnp.int32 and int(updates["n"]) == 0
    assert updates["empty"].shape == (0, 4)
    new = optax.apply_updates(params, updates)
    assert int(new["n"]) == 3 and np.all(np.asarray(new["w"]) != 1.0)
    for params in ({}, {"n": jnp.int32(3)}, {"a": [], "b": ()}):
        updates, state = opt.update(params, opt.init(params, 10), params, jnp.float32(1.0))
        assert jax.tree.structure(updates) == jax.tree.structure(params)
        assert int(state.step) == 1


@pytest.mark.parametrize("rows", [6, 1000], ids=["one-matmul", "blocked"])
def test_jit_vmap_over_theta_and_determinism(rows):
    lopt = AdaFacLOpt()
    thetas = [perturbed_theta(lopt, seed) for seed in range(3)]
    batched = jax.tree.map(lambda *x: jnp.stack(x), *thetas)
    params = {"w": jnp.linspace(-1, 1, rows * 12).reshape(rows, 12), "b": jnp.zeros(12)}
    grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size) * 0.1).reshape(p.shape), params)
    state = lopt.optimizer(thetas[0]).init(params, 20)

    def update(theta, state):
        return lopt.optimizer(theta).update(grads, state, params, jnp.float32(1.0))

    many = jax.jit(jax.vmap(update, in_axes=(0, None)))(batched, state)
    for i, theta in enumerate(thetas):
        one, one_state = jax.jit(update)(theta, state)
        again, _ = jax.jit(update)(theta, state)
        for k in params:
            np.testing.assert_array_equal(one[k], again[k])  # deterministic
            # Batched matmuls round differently: float32 round-off of the update's scale.
            scale = np.abs(one[k]).max()
            np.testing.assert_allclose(many[0][k][i], one[k], rtol=1e-5, atol=1e-6 * scale)
        for a, b in zip(jax.tree.leaves(many[1]), jax.tree.leaves(one_state), strict=True):
            np.testing.assert_allclose(a[i] if a.ndim > b.ndim else a, b, rtol=1e-6)
    # Different meta-parameters, different updates.
    assert not np.allclose(many[0]["w"][0], many[0]["w"][1])


@pytest.mark.slow  # ~7 s; the slow stage keeps the default stage under 10 minutes
def test_blocking_does_not_change_the_update(monkeypatch):
    # Tall, wide, column and conv tensors and small leaves; the same update whether the
    # network runs once on every parameter or in blocks of 7 parameters (tiles of 2 rows,
    # of 7 and 5 columns, of 7 rows, single rows; most with an overlapping last tile).
    shapes = {"t": (33, 3), "w": (2, 50), "col": (40, 1), "k": (3, 3, 2, 4), "v": (9,), "s": ()}
    rng = np.random.default_rng(3)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [
        {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(2)
    ]
    lopt = AdaFacLOpt()
    theta = perturbed_theta(lopt)

    def run():
        opt = lopt.optimizer(theta)
        state = opt.init(params, 10)
        for g in grads:
            updates, state = jax.jit(opt.update)(g, state, params, jnp.float32(1.0))
        return updates

    whole = run()
    for block in (7,):
        monkeypatch.setattr(adafac, "_BLOCK", block)
        blocked = run()
        for k in shapes:
            scale = np.abs(whole[k]).max()
            np.testing.assert_allclose(blocked[k], whole[k], rtol=1e-5, atol=1e-6 * scale)


def test_works_through_as_optax_in_a_chain():
    lopt = AdaFacLOpt()
    theta = perturbed_theta(lopt)
    tx = optax.chain(optax.clip_by_global_norm(1.0), as_optax(lopt, theta, num_steps=50))
    params = {"w": jnp.linspace(-1, 1, 20).reshape(4, 5), "b": jnp.zeros(5)}

    def loss_fn(p):
        return jnp.sum((p["w"] - 0.5) ** 2) + jnp.sum(p["b"] ** 2)

    state = tx.init(params)

    @jax.jit
    def train_step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params, loss=loss)
        return optax.apply_updates(params, updates), state, loss

    new, state, _ = train_step(params, state)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(new))
    assert not np.allclose(new["w"], params["w"])
    assert int(state[1].step) == 1
    with pytest.raises(ValueError, match="loss"):
        tx.update(params, state, params)


def test_options_round_trip_through_json():
    lopt = AdaFacLOpt(hidden_size=4, momentum_decays=[0.9, 0.99], step_schedule="cosine")
    assert lopt.momentum_decays == (0.9, 0.99)  # lists become tuples: hashable, comparable
    options = json.loads(json.dumps(dataclasses.asdict(lopt)))
    rebuilt = AdaFacLOpt(**options)  # lists from JSON
    assert rebuilt == lopt and hash(rebuilt) == hash(lopt)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"hidden_layers": 0}, "hidden_layers"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"hidden_size": 2.5}, "hidden_size"),
        ({"momentum_decays": ()}, "momentum_decays"),
        ({"momentum_decays": (0.9, 1.0)}, "momentum_decays"),
        ({"rms_decays": (-0.1,)}, "rms_decays"),
        ({"rms_decays": 0.9}, "rms_decays"),
        ({"step_mult": float("nan")}, "step_mult"),
        ({"exp_mult": 0.0}, "exp_mult"),
        ({"step_schedule": "linear"}, "step_schedule"),
        ({"step_schedule_final": 1.5}, "step_schedule_final"),
    ],
)
def test_meaningless_settings_are_refused_naming_the_setting(kwargs, key):
    with pytest.raises(ValueError, match=f"AdaFacLOpt: .*{key}"):
        AdaFacLOpt(**kwargs)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as err:
        AdaFacLOpt(hidden_size=0, rms_decays=(), exp_mult=-1.0)
    assert all(k in str(err.value) for k in ("hidden_size", "rms_decays", "exp_mult"))
