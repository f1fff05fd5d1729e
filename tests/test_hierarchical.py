"""Tests of the hierarchical (VeLO-style) learned optimizer."""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from lopt_cases import (
    EPS,
    TANH_SCALES,
    assert_masked_entries_keep_state,
    flax_params,
    haiku_params,
    nnx_state,
)

import lopt.hierarchical as hierarchical
from lopt.export import as_optax
from lopt.hierarchical import HierarchicalLOpt, HierarchicalLOptState

NUM_TENSOR_FEATURES = 31  # of the default configuration (see _reference_tensor_features)


def _expected_count(d, lstm_hidden, num_mix, num_context, hidden, layers, n_decays):
    """LSTM 4h(d + h + 1), head (h + 1)(K + 1 + C), bank K · Σ (in + 1) · out."""
    lstm = 4 * lstm_hidden * (d + lstm_hidden + 1)
    head = (lstm_hidden + 1) * (num_mix + 1 + num_context)
    sizes = [2 + 2 * n_decays + 2 + num_context] + [hidden] * layers + [2]
    bank = num_mix * sum((i + 1) * o for i, o in zip(sizes[:-1], sizes[1:], strict=True))
    return lstm + head + bank


def test_meta_parameter_count_matches_the_docstring_and_the_formula():
    lopt = HierarchicalLOpt()
    n = _count(lopt)
    assert len(lopt.tensor_feature_names) == NUM_TENSOR_FEATURES
    assert n == _expected_count(NUM_TENSOR_FEATURES, 32, 4, 2, 8, 1, 2) == 8847
    assert n == lopt.num_meta_params
    assert "Meta-parameters of the default configuration: 8,847" in hierarchical.__doc__
    other = HierarchicalLOpt(
        lstm_hidden=5,
        hidden_size=6,
        hidden_layers=2,
        num_mix=3,
        num_context=0,
        momentum_decays=(0.9,),
        loss_decays=(0.9, 0.95, 0.99),
    )
    # One momentum decay fewer (its rms and sign agreement), one loss decay more (the loss
    # against its average, the average against the first loss).
    d = NUM_TENSOR_FEATURES - 2 + 2
    assert len(other.tensor_feature_names) == d
    n = _count(other)
    assert n == other.num_meta_params == _expected_count(d, 5, 3, 0, 6, 2, 1)
    three = HierarchicalLOpt(momentum_decays=(0.5, 0.9, 0.99))  # the default before
    assert _count(three) == _expected_count(NUM_TENSOR_FEATURES + 2, 32, 4, 2, 8, 1, 3) == 9167


def _count(lopt):
    """The number of meta-parameters `init_meta` makes (from shapes alone)."""
    shapes = jax.eval_shape(lopt.init_meta, jax.random.PRNGKey(0))
    return sum(x.size for x in jax.tree.leaves(shapes))


def _trained_looking_theta(lopt, seed=0):
    """Meta-parameters of `init_meta`'s structure with every entry random: matrices at the
    Lecun scale plus noise, vectors (zero biases when fresh) noise of 0.3. Drawn with NumPy:
    no compilation."""
    shapes = jax.eval_shape(lopt.init_meta, jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def draw(x):
        scale = math.sqrt(1.0 / x.shape[-2] + 0.09) if len(x.shape) >= 2 else 0.3
        return jnp.asarray(scale * rng.normal(size=x.shape), jnp.float32)

    return jax.tree.map(draw, shapes)


@functools.partial(jax.jit, static_argnums=0)
def _fresh_theta(lopt, key):
    return lopt.init_meta(key)


@functools.partial(jax.jit, static_argnums=0)
def _update(lopt, theta, grads, state, params, loss):
    """`lopt.optimizer(theta).update(...)`, compiled once per configuration and tree, any θ."""
    return lopt.optimizer(theta).update(grads, state, params, loss)


@functools.partial(jax.jit, static_argnums=0)
def _features(lopt, grads, state, params, loss):
    return lopt.tensor_features(grads, state, params, loss)


@functools.partial(jax.jit, static_argnums=0)
def _init(lopt, params, num_steps):
    return lopt.optimizer(None).init(params, num_steps)  # the state does not depend on θ


def _small_problem():
    """Most tests share this tree (and so their compiled updates): floats and a counter."""
    params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4), "b": jnp.zeros(4), "n": jnp.int32(2)}
    grads = {"w": jnp.cos(jnp.arange(12.0)).reshape(3, 4), "b": jnp.sin(jnp.arange(4.0)), "n": 0}
    return params, grads


def _scaled(grads, scale, shift=0):
    """The float gradients of `_small_problem` scaled (and shifted in phase)."""
    w = jnp.sin(jnp.arange(12.0) + shift).reshape(3, 4)
    return {**grads, "w": scale * w, "b": scale * jnp.cos(jnp.arange(4.0) + shift)}


# ---------------------------------------------------------------------------------------------
# An independent float64 NumPy reference of the documented update, tensor by tensor, with the
# mixed weights formed per tensor (not the bank-output mixing the implementation uses).
# ---------------------------------------------------------------------------------------------


def _log01(x):
    return 0.1 * np.clip(np.log(x + 1e-30), -80.0, 80.0)


def _ratio(a, b):
    return np.clip(a / (np.abs(b) + 1e-6), -5.0, 5.0)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _reference_step(lopt, theta, params, grads, st, loss, step, num_steps):
    """One update of every tensor; `st` (a dict of float64 arrays) is updated in place.

    Returns the list of updates (float64, one per tensor).
    """
    w = jax.tree.map(lambda a: np.asarray(a, np.float64), theta)
    decays = np.asarray(lopt.momentum_decays)
    n_dec, k = len(decays), lopt.num_mix
    # Loss history: a non-finite loss changes nothing and reads as the fastest average.
    if np.isfinite(loss):
        if st["seen"] == 0:
            st["ema"] = np.full(len(lopt.loss_decays), loss)
            st["first"] = loss
        else:
            st["ema"] = st["ema"] * np.asarray(lopt.loss_decays) + loss * (
                1 - np.asarray(lopt.loss_decays)
            )
        st["seen"] = 1.0
    cur = loss if np.isfinite(loss) else st["ema"][0]
    loss_feats = np.concatenate(
        [
            _ratio(cur - st["ema"], st["ema"]),
            _ratio(st["ema"] - st["first"], st["first"]),
            [
                _ratio(cur - st["first"], st["first"]),
                0.1 * np.log(np.clip(cur, 1e-6, 1e6)),
                0.0 if np.isfinite(loss) else 1.0,
            ],
        ]
    )
    frac = min(step, num_steps) / max(num_steps, 1)
    progress = [frac, frac**2, np.sqrt(frac)] + [np.tanh(step / s) for s in TANH_SCALES]
    xs, feats = [], []
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        m = st["m"][i] * decays.reshape((-1,) + (1,) * g.ndim) + g[None] * (
            1 - decays.reshape((-1,) + (1,) * g.ndim)
        )
        v = st["v"][i] * lopt.rms_decay + g**2 * (1 - lopt.rms_decay)
        st["m"][i], st["v"][i] = m, v
        inv = 1 / np.sqrt(v + EPS)
        cols = [p, g, *m, v, *(m * inv[None]), g * inv]
        f = np.stack([c.ravel() for c in cols])  # [features, n]
        feats.append(f / np.sqrt(np.mean(f**2, axis=1, keepdims=True) + EPS))
        rank = min(p.ndim, 4)
        fan = int(np.prod(p.shape[:-1])) if p.ndim >= 2 else 1
        xs.append(
            np.concatenate(
                [
                    [_log01(np.mean(np.abs(g)))],
                    [_log01(np.sqrt(np.mean(m[j] ** 2))) for j in range(n_dec)],
                    [_log01(np.sqrt(np.mean(v))), _log01(np.sqrt(np.mean(p**2)))],
                    [np.mean(np.sign(g) * np.sign(m[j])) for j in range(n_dec)],
                    [_log01(np.mean(np.abs(m[n_dec // 2] * inv))), 0.0],
                    loss_feats,
                    progress,
                    np.eye(5)[rank],
                    [0.1 * np.log(max(p.size, 1)), 0.1 * np.log(fan)],
                ]
            )
        )
    x = np.stack(xs)
    lstm = w["lstm"]
    gates = x @ lstm["wx"] + st["h"] @ lstm["wh"] + lstm["b"]
    gi, gf, gg, go = np.split(gates, 4, axis=1)
    st["c"] = _sigmoid(gf) * st["c"] + _sigmoid(gi) * np.tanh(gg)
    st["h"] = _sigmoid(go) * np.tanh(st["c"])
    head = st["h"] @ w["head"]["w"] + w["head"]["b"]
    if lopt.mixing == "softmax":
        e = np.exp(head[:, :k] - head[:, :k].max(axis=1, keepdims=True))
        mix = e / e.sum(axis=1, keepdims=True)
    else:
        mix = 1.0 / k + head[:, :k]
    r = lopt.tensor_step_range
    mult = np.exp(r * np.tanh(head[:, k] / r))
    context = np.tanh(head[:, k + 1 :])
    decay = min(1.0, num_steps / max(step, 1))
    if lopt.step_schedule == "cosine":
        fin = lopt.step_schedule_final
        decay *= fin + (1 - fin) * 0.5 * (1 + np.cos(np.pi * frac))
    updates = []
    for t, f in enumerate(feats):
        # This tensor's MLP: every layer's weights are its mixture of the bank's.
        h = np.concatenate([f, np.repeat(context[t][:, None], f.shape[1], axis=1)]).T
        layers = [w["bank"][f"layer_{j}"] for j in range(len(w["bank"]))]
        for j, layer in enumerate(layers):
            wt = np.einsum("k,kio->io", mix[t], layer["w"])
            h = h @ wt + mix[t] @ layer["b"]
            if j < len(layers) - 1:
                h = np.maximum(h, 0.0)
        u = decay * lopt.step_mult * mult[t] * h[:, 0] * np.exp(lopt.exp_mult * h[:, 1])
        updates.append(u.reshape(params[t].shape))
    return updates


# Ranks 2, 1, 4, 0. With batch_below=10, "a" and "c" apply their own mixed weights while "b"
# and "d" run batched through the bank; by default all run batched.
SHAPES = {"a": (3, 4), "b": (5,), "c": (2, 3, 2, 3), "d": ()}


@pytest.mark.parametrize(
    "lopt",
    [
        HierarchicalLOpt(),
        HierarchicalLOpt(
            lstm_hidden=6,
            hidden_size=5,
            hidden_layers=2,
            num_mix=3,
            mixing="linear",
            num_context=0,
            momentum_decays=(0.5, 0.95),
            loss_decays=(0.8, 0.9, 0.99),
            rms_decay=0.99,
            step_mult=0.01,
            exp_mult=0.5,
            tensor_step_range=1.0,
        ),
        HierarchicalLOpt(step_schedule="cosine", step_schedule_final=0.2),
        HierarchicalLOpt(hidden_layers=2, batch_below=0),
        HierarchicalLOpt(
            mixing="linear", hidden_layers=2, num_context=0, num_mix=2, batch_below=10
        ),
    ],
    ids=["default", "linear-2-layers", "cosine", "own-weights", "both-ways"],
)
def test_updates_match_an_independent_float64_reference(lopt):
    theta = _trained_looking_theta(lopt)
    rng = np.random.default_rng(0)
    num_steps = 6
    keys = sorted(SHAPES)  # dict leaves come out in sorted key order
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    state = _init(lopt, params, num_steps)
    n_dec, hl = len(lopt.momentum_decays), lopt.lstm_hidden
    st = {
        "m": [np.zeros((n_dec,) + SHAPES[k]) for k in keys],
        "v": [np.zeros(SHAPES[k]) for k in keys],
        "h": np.zeros((len(keys), hl)),
        "c": np.zeros((len(keys), hl)),
        "ema": np.zeros(len(lopt.loss_decays)),
        "first": 0.0,
        "seen": 0.0,
    }
    # A NaN first loss (nothing seen yet), a negative one, a zero one, an infinite one.
    losses = [np.nan, 2.0, 1.5, -0.5, 0.0, np.inf, 1.2, 3.0]
    for step, loss in enumerate(losses):
        params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
        grads = {k: (2.0 * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}
        updates, state = _update(lopt, theta, grads, state, params, jnp.float32(loss))
        refs = _reference_step(
            lopt,
            theta,
            [np.float64(params[k]) for k in keys],
            [np.float64(grads[k]) for k in keys],
            st,
            float(loss),
            step,
            num_steps,
        )
        for k, ref in zip(keys, refs, strict=True):
            got = np.asarray(updates[k])
            assert got.dtype == np.float32 and got.shape == SHAPES[k]
            # float32 features, LSTM and narrow matmuls: measured errors ≤ 2e-6 of the
            # tensor's update scale; 5e-5 leaves a 25x margin.
            scale = np.abs(ref).max()
            np.testing.assert_allclose(got, ref, rtol=5e-5, atol=5e-5 * scale, err_msg=k)
        np.testing.assert_allclose(state.lstm_h, st["h"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(state.lstm_c, st["c"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(state.loss_ema, st["ema"], rtol=1e-6)
        assert float(state.loss_first) == np.float32(st["first"])
        assert float(state.loss_seen) == st["seen"]


# ---------------------------------------------------------------------------------------------
# Pytrees, dtypes, numerics.
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~7 s; the zoo contract (tests/test_lopt_zoo.py) covers any pytree
def test_fresh_optimizer_takes_small_finite_steps_on_any_pytree():
    # Nested library pytrees, plus an integer counter, a conv kernel and a scalar.
    params = {
        "flax": flax_params(),
        "haiku": haiku_params(),
        "nnx": nnx_state(),
        "count": jnp.int32(4),
        "conv": jnp.ones((3, 3, 2, 4)),
        "scale": jnp.float32(1.0),
    }
    lopt = HierarchicalLOpt()
    theta = _fresh_theta(lopt, jax.random.PRNGKey(1))
    state = _init(lopt, params, 100)
    assert state.lstm_h.shape == (len(jax.tree.leaves(params)) - 1, lopt.lstm_hidden)
    grads = jax.tree.map(
        lambda p: jnp.sin(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params
    )
    updates, state = _update(lopt, theta, grads, state, params, jnp.float32(2.0))
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert u.shape == p.shape and u.dtype == p.dtype
    assert int(updates["count"]) == 0
    sizes = []
    for u in jax.tree.leaves({k: v for k, v in updates.items() if k != "count"}):
        assert np.all(np.isfinite(u))
        # step_mult · d · exp(exp_mult · m) · multiplier (≈ 1) with O(1) outputs.
        assert 0 < np.abs(u).max() < 1e-2
        sizes.append(np.abs(u).mean())
    assert 1e-5 < np.mean(sizes) < 3e-3  # about step_mult (1e-3) per parameter
    assert int(state.step) == 1
    for x in jax.tree.leaves(state):
        assert x.dtype in (jnp.float32, jnp.int32)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_params_get_the_float32_update_cast_once(dtype):
    lopt = HierarchicalLOpt()
    theta = _trained_looking_theta(lopt)
    rng = np.random.default_rng(0)
    p32 = {"kernel": rng.normal(size=(32, 40)).astype(np.float32), "bias": np.zeros(40, np.float32)}
    g32 = {k: (300.0 * rng.normal(size=v.shape)).astype(np.float32) for k, v in p32.items()}
    low = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)  # noqa: E731
    up32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
    p, g = low(p32), low(g32)
    updates, state = _update(lopt, theta, g, _init(lopt, p, 100), p, jnp.float32(1.0))
    # The reference: the same (rounded) numbers in float32 throughout, cast at the end.
    ref, ref_state = _update(
        lopt, theta, up32(g), _init(lopt, up32(p), 100), up32(p), jnp.float32(1.0)
    )
    for k in p32:
        assert updates[k].dtype == dtype
        assert np.all(np.isfinite(np.asarray(updates[k], np.float32)))
        assert np.abs(np.asarray(updates[k], np.float32)).max() > 0
        np.testing.assert_array_equal(updates[k], ref[k].astype(dtype))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        assert a.dtype == b.dtype  # the state is float32 whatever the parameter dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e30, 3e38])
def test_features_are_finite_and_bounded_for_extreme_gradients_and_losses(scale):
    lopt = HierarchicalLOpt()
    params, grads = _small_problem()
    theta = _fresh_theta(lopt, jax.random.PRNGKey(0))
    state = _init(lopt, params, 100)
    # Every extreme loss, in a history that holds the others.
    for i, loss in enumerate([0.0, -3.0, 1e30, np.nan, 1e-30, np.inf, -np.inf, -1e30, 2.0]):
        g = _scaled(grads, scale, i)
        x = _features(lopt, g, state, params, jnp.float32(loss))
        assert x.shape == (2, len(lopt.tensor_feature_names))
        assert np.all(np.isfinite(x)) and np.abs(x).max() <= 8.0, loss
        _, state = _update(lopt, theta, g, state, params, jnp.float32(loss))
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e30, 3e38])
def test_zero_tiny_and_huge_gradients_give_finite_updates_and_state(scale):
    lopt = HierarchicalLOpt()
    theta = _trained_looking_theta(lopt)
    params, grads = _small_problem()
    state = _init(lopt, params, 100)
    for i in range(3):
        g = _scaled(grads, scale, i)
        updates, state = _update(lopt, theta, g, state, params, jnp.float32(1.0 / (i + 1)))
        for u in jax.tree.leaves(updates):
            assert np.all(np.isfinite(u))
            assert np.abs(u).max() < 1.0  # a step, not an explosion
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def test_non_finite_gradient_entries_get_zero_update_and_stay_out_of_the_state():
    lopt = HierarchicalLOpt()
    theta = _trained_looking_theta(lopt)
    rng = np.random.default_rng(1)
    params = {"w": rng.normal(size=(4, 5)).astype(np.float32), "b": np.zeros(5, np.float32)}
    grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    state = _init(lopt, params, 50)
    _, state = _update(lopt, theta, grads, state, params, jnp.float32(1.0))
    bad = {k: v.copy() for k, v in grads.items()}
    bad["w"][1, 2], bad["w"][3, 0], bad["b"][4] = np.nan, np.inf, -np.inf
    updates, new_state = _update(lopt, theta, bad, state, params, jnp.float32(1.0))
    mask = {k: ~np.isfinite(v) for k, v in bad.items()}
    # Every finite entry of the per-parameter state matches the state that a gradient with
    # zeros at the masked places gives; every masked entry keeps the old state.
    zeroed = {k: np.where(mask[k], 0.0, v).astype(np.float32) for k, v in bad.items()}
    _, zero_state = _update(lopt, theta, zeroed, state, params, jnp.float32(1.0))
    assert_masked_entries_keep_state(updates, new_state, state, zero_state, mask)
    # The LSTM sees the fraction of non-finite entries (1/20 and 1/5 of the tensors).
    x = _features(lopt, bad, state, params, jnp.float32(1.0))
    j = lopt.tensor_feature_names.index("nonfinite_fraction")
    np.testing.assert_allclose(x[:, j], [1 / 5, 2 / 20], rtol=1e-6)
    assert np.all(np.isfinite(new_state.lstm_h)) and np.all(np.isfinite(new_state.lstm_c))
    # The optimizer recovers: later finite gradients give finite updates everywhere.
    updates, _ = _update(lopt, theta, grads, new_state, params, jnp.float32(1.0))
    assert all(np.all(np.isfinite(u)) and np.all(u != 0) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("bad_loss", [np.nan, np.inf, -np.inf])
def test_non_finite_loss_leaves_the_loss_history_untouched(bad_loss):
    lopt = HierarchicalLOpt()
    theta = _trained_looking_theta(lopt)
    params, grads = _small_problem()
    state = _init(lopt, params, 100)
    # Before any finite loss: nothing is recorded, and the next finite loss starts it.
    _, s = _update(lopt, theta, grads, state, params, jnp.float32(bad_loss))
    assert float(s.loss_seen) == 0.0 and float(s.loss_first) == 0.0
    np.testing.assert_array_equal(s.loss_ema, state.loss_ema)
    _, s = _update(lopt, theta, grads, s, params, jnp.float32(2.0))
    assert float(s.loss_first) == 2.0 and np.all(np.asarray(s.loss_ema) == 2.0)
    _, s = _update(lopt, theta, grads, s, params, jnp.float32(1.0))
    updates, s2 = _update(lopt, theta, grads, s, params, jnp.float32(bad_loss))
    assert np.all(np.isfinite(updates["w"])) and np.abs(updates["w"]).max() > 0
    for name in ("loss_ema", "loss_first", "loss_seen"):
        np.testing.assert_array_equal(getattr(s2, name), getattr(s, name))
    # It reads as "no change" against the fast average, and is flagged.
    x = np.asarray(_features(lopt, grads, s, params, jnp.float32(bad_loss)))[0]
    names = lopt.tensor_feature_names
    assert x[names.index("loss_nonfinite")] == 1.0
    assert x[names.index("loss_vs_ema_0.9")] == 0.0
    assert int(s2.step) == int(s.step) + 1


# ---------------------------------------------------------------------------------------------
# Transformations: jit, vmap, determinism; the optax export.
# ---------------------------------------------------------------------------------------------


def test_jit_vmap_over_particles_and_determinism():
    lopt = HierarchicalLOpt()
    params, grads = _small_problem()
    thetas = [_trained_looking_theta(lopt, seed) for seed in range(3)]
    # Each particle with its own history (LSTM memory, loss averages) after two steps.
    states = []
    for theta in thetas:
        state = _init(lopt, params, 20)
        for loss in (1.0, 0.8):
            _, state = _update(lopt, theta, grads, state, params, jnp.float32(loss))
        states.append(state)
    stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)  # noqa: E731
    losses = jnp.asarray([1.0, 2.0, 3.0])

    @jax.jit
    @jax.vmap
    def step(theta, state, loss):
        return lopt.optimizer(theta).update(grads, state, params, loss)

    vmapped = step(stack(thetas), stack(states), losses)
    for i, (theta, state) in enumerate(zip(thetas, states, strict=True)):
        one = _update(lopt, theta, grads, state, params, losses[i])
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(vmapped), strict=True):
            np.testing.assert_allclose(b[i], a, rtol=1e-5, atol=1e-9)
    assert not np.allclose(vmapped[0]["w"][0], vmapped[0]["w"][1])  # particles differ
    # The same inputs give bit-identical outputs.
    again = step(stack(thetas), stack(states), losses)
    for a, b in zip(jax.tree.leaves(vmapped), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    e1 = _update(lopt, thetas[0], grads, states[0], params, losses[0])
    e2 = _update(lopt, thetas[0], grads, states[0], params, losses[0])
    for a, b in zip(jax.tree.leaves(e1), jax.tree.leaves(e2), strict=True):
        np.testing.assert_array_equal(a, b)


def test_exported_through_optax_chain_with_loss_and_refused_without():
    lopt = HierarchicalLOpt()
    theta = _trained_looking_theta(lopt)
    params, grads = _small_problem()
    # optax's clipping itself needs float gradients: the integer counter stays out here.
    params, grads = ({k: v for k, v in t.items() if k != "n"} for t in (params, grads))
    grads = jax.tree.map(lambda g: 3.0 * g, grads)  # a global norm > 1: clipping acts
    tx = optax.chain(optax.clip_by_global_norm(1.0), as_optax(lopt, theta, num_steps=20))
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params, loss=jnp.float32(1.0))
    # The same as the learned optimizer on clipped gradients.
    norm = float(optax.global_norm(grads))
    assert norm > 1.0
    clipped = jax.tree.map(lambda g: g / norm, grads)
    ref, _ = _update(lopt, theta, clipped, _init(lopt, params, 20), params, jnp.float32(1.0))
    for k in params:
        np.testing.assert_allclose(updates[k], ref[k], rtol=1e-5, atol=1e-9)
    new = optax.apply_updates(params, updates)
    assert np.all(np.asarray(new["w"]) != np.asarray(params["w"]))
    with pytest.raises(ValueError, match="loss"):
        tx.update(grads, state, params)
    with pytest.raises(ValueError, match="loss"):
        lopt.optimizer(theta).update(grads, _init(lopt, params, 20), params)


# ---------------------------------------------------------------------------------------------
# What the update depends on: LSTM memory, loss, mixing, gradient scale.
# ---------------------------------------------------------------------------------------------


def test_lstm_state_persists_and_feeds_the_next_step():
    lopt = HierarchicalLOpt()
    theta = _trained_looking_theta(lopt)
    params, grads = _small_problem()
    state = _init(lopt, params, 20)
    _, s1 = _update(lopt, theta, grads, state, params, jnp.float32(1.0))
    assert np.abs(np.asarray(s1.lstm_h)).min() > 0 and np.abs(np.asarray(s1.lstm_c)).min() > 0
    u_kept, s2 = _update(lopt, theta, grads, s1, params, jnp.float32(1.0))
    reset = s1._replace(lstm_h=jnp.zeros_like(s1.lstm_h), lstm_c=jnp.zeros_like(s1.lstm_c))
    u_reset, _ = _update(lopt, theta, grads, reset, params, jnp.float32(1.0))
    assert not np.allclose(u_kept["w"], u_reset["w"], rtol=1e-3, atol=0)
    assert not np.allclose(s2.lstm_h, s1.lstm_h)


def test_the_loss_matters():
    lopt = HierarchicalLOpt()
    theta = _trained_looking_theta(lopt)
    params, grads = _small_problem()
    _, state = _update(lopt, theta, grads, _init(lopt, params, 20), params, jnp.float32(1.0))
    # Same history, different current loss: progress (0.5) vs regress (2.0).
    u_down, _ = _update(lopt, theta, grads, state, params, jnp.float32(0.5))
    u_up, _ = _update(lopt, theta, grads, state, params, jnp.float32(2.0))
    assert not np.allclose(u_down["w"], u_up["w"], rtol=1e-3, atol=0)
    # Loss-free features: the loss reaches the update through the loss features alone.
    x_down = _features(lopt, grads, state, params, jnp.float32(0.5))
    x_up = _features(lopt, grads, state, params, jnp.float32(2.0))
    differ = {n for j, n in enumerate(lopt.tensor_feature_names) if x_down[0, j] != x_up[0, j]}
    assert differ == {
        "loss_vs_ema_0.9",
        "loss_vs_ema_0.99",
        "ema_0.9_vs_first_loss",
        "ema_0.99_vs_first_loss",
        "loss_vs_first_loss",
        "log_loss",
    }


@pytest.mark.parametrize("batch_below", [1024, 0], ids=["batched", "own-weights"])
def test_the_update_is_the_mixture_of_the_bank(batch_below):
    lopt = HierarchicalLOpt(batch_below=batch_below)
    theta = _trained_looking_theta(lopt)
    params, grads = _small_problem()

    def update(theta):
        state = _init(lopt, params, 20)
        return _update(lopt, theta, grads, state, params, jnp.float32(1.0))[0]["w"]

    def with_bank_member(theta, k, delta):
        bank = {
            name: {"w": layer["w"].at[k].add(delta), "b": layer["b"]}
            for name, layer in theta["bank"].items()
        }
        return {**theta, "bank": bank}

    base = update(theta)
    for k in range(lopt.num_mix):
        assert not np.allclose(update(with_bank_member(theta, k, 0.5)), base, rtol=1e-3, atol=0)
    # A head that puts all the mixing weight on member 0 (softmax of logits 200 apart: the
    # others get exactly 0 in float32): only member 0 matters then.
    head_b = jnp.zeros_like(theta["head"]["b"]).at[0].set(200.0)
    one = {**theta, "head": {"w": theta["head"]["w"] * 0.01, "b": head_b}}
    base = update(one)
    np.testing.assert_array_equal(update(with_bank_member(one, 2, 0.5)), base)
    assert not np.allclose(update(with_bank_member(one, 0, 0.5)), base, rtol=1e-3, atol=0)


def test_direction_is_scale_free_in_gradient_without_the_magnitude_features():
    # Per-parameter features are normalised per tensor, and the per-tensor features are
    # ratios, signs and logs: only the log magnitudes of the gradient, momenta and rms see
    # the gradient's scale. Without them (their LSTM input weights zeroed), scaling every
    # gradient by 1000 leaves the first update unchanged; with them, it changes it.
    lopt = HierarchicalLOpt()
    theta = _trained_looking_theta(lopt, seed=3)
    names = lopt.tensor_feature_names
    magnitude = [
        names.index(n)
        for n in ("log_mean_abs_grad", "log_sqrt_mean_rms")
        + tuple(f"log_rms_momentum_{d}" for d in lopt.momentum_decays)
    ]
    blind = {
        **theta,
        "lstm": {**theta["lstm"], "wx": theta["lstm"]["wx"].at[np.asarray(magnitude)].set(0.0)},
    }
    params = {"w": jnp.linspace(-1, 1, 20).reshape(4, 5), "b": jnp.linspace(0.5, 1, 5)}
    # Gradients bounded away from zero, where the rsqrt epsilons are negligible.
    g = {"w": (1.5 + jnp.sin(jnp.arange(20.0))).reshape(4, 5), "b": 1.5 + jnp.cos(jnp.arange(5.0))}
    big = jax.tree.map(lambda x: 1000 * x, g)
    for th, invariant in ((blind, True), (theta, False)):
        s = _init(lopt, params, 50)
        u1, _ = _update(lopt, th, g, s, params, jnp.float32(1.0))
        u2, _ = _update(lopt, th, big, s, params, jnp.float32(1.0))
        for k in params:
            scale = float(np.abs(u1[k]).max())
            # Only the 1e-8 epsilons are not scale-free (as in the MLP optimizer's test).
            close = np.allclose(u1[k], u2[k], rtol=0, atol=5e-3 * scale)
            assert close == invariant, k


# ---------------------------------------------------------------------------------------------
# Trees, horizons, settings.
# ---------------------------------------------------------------------------------------------


def test_float0_and_integer_leaves_pass_through_as_in_optax():
    lopt = HierarchicalLOpt()
    theta = _fresh_theta(lopt, jax.random.PRNGKey(0))
    params = {"w": jnp.ones((2, 3)), "n": jnp.int32(3)}
    grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2) * p["n"], allow_int=True)(params)
    assert grads["n"].dtype == jax.dtypes.float0
    updates, state = _update(lopt, theta, grads, _init(lopt, params, 10), params, jnp.float32(1.0))
    assert updates["n"].dtype == jnp.int32 and int(updates["n"]) == 0
    new = optax.apply_updates(params, updates)
    assert int(new["n"]) == 3 and np.all(np.asarray(new["w"]) != 1.0)
    assert int(state.step) == 1 and state.lstm_h.shape == (1, lopt.lstm_hidden)


@pytest.mark.parametrize(
    "params", [{}, {"n": jnp.int32(3)}, {"a": [], "b": ()}], ids=["empty", "int", "containers"]
)
def test_trees_without_float_leaves_pass_through(params):
    lopt = HierarchicalLOpt()
    theta = _fresh_theta(lopt, jax.random.PRNGKey(0))
    updates, state = _update(lopt, theta, params, _init(lopt, params, 10), params, jnp.float32(1.0))
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert all(int(u) == 0 for u in jax.tree.leaves(updates))
    assert int(state.step) == 1 and float(state.loss_first) == 1.0
    assert state.lstm_h.shape == (0, lopt.lstm_hidden)


def test_state_is_a_float32_pytree_that_vmaps():
    lopt = HierarchicalLOpt()
    params, _ = _small_problem()
    states = jax.vmap(lambda n: lopt.optimizer(None).init(params, n))(jnp.arange(1, 4))
    assert isinstance(states, HierarchicalLOptState)
    assert states.lstm_h.shape == (3, 2, lopt.lstm_hidden)
    assert states.num_steps.dtype == jnp.int32 and states.step.dtype == jnp.int32
    others = [x for name, x in states._asdict().items() if name not in ("step", "num_steps")]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(others))


def test_cosine_schedule_and_past_the_horizon_scale_the_update():
    theta = _trained_looking_theta(HierarchicalLOpt())
    const = HierarchicalLOpt()
    cos = HierarchicalLOpt(step_schedule="cosine", step_schedule_final=0.1)
    params, grads = _small_problem()
    state = _init(const, params, 400)

    def update_at(lopt, step):
        s = state._replace(step=jnp.int32(step))
        return np.asarray(_update(lopt, theta, grads, s, params, jnp.float32(1.0))[0]["w"])

    for step, mult in ((0, 1.0), (200, 0.55), (400, 0.1), (800, 0.1)):
        u_const = update_at(const, step)
        assert np.abs(u_const).max() > 0
        np.testing.assert_allclose(update_at(cos, step), mult * u_const, rtol=1e-5, atol=1e-12)
    # Past the horizon, once tanh(step / 300) has saturated too, updates differ only by the
    # num_steps / step decay.
    np.testing.assert_allclose(
        update_at(const, 10_000) * 10_000, update_at(const, 100_000) * 100_000, rtol=1e-5
    )


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"lstm_hidden": 0}, "lstm_hidden"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"hidden_layers": 0}, "hidden_layers"),
        ({"num_mix": 0}, "num_mix"),
        ({"num_mix": 2.5}, "num_mix"),
        ({"num_context": -1}, "num_context"),
        ({"batch_below": -1}, "batch_below"),
        ({"mixing": "max"}, "mixing"),
        ({"momentum_decays": ()}, "momentum_decays"),
        ({"momentum_decays": (0.9, 1.0)}, "momentum_decays"),
        ({"loss_decays": (-0.1,)}, "loss_decays"),
        ({"rms_decay": 1.0}, "rms_decay"),
        ({"step_mult": float("nan")}, "step_mult"),
        ({"exp_mult": 0.0}, "exp_mult"),
        ({"tensor_step_range": -1.0}, "tensor_step_range"),
        ({"step_schedule": "linear"}, "step_schedule"),
        ({"step_schedule_final": 1.5}, "step_schedule_final"),
    ],
)
def test_meaningless_settings_are_refused_naming_the_setting(kwargs, key):
    with pytest.raises(ValueError, match=f"HierarchicalLOpt: .*{key}"):
        HierarchicalLOpt(**kwargs)


def test_options_round_trip_through_json_as_the_registry_reads_them():
    lopt = HierarchicalLOpt(num_mix=3, mixing="linear", loss_decays=(0.5, 0.9, 0.999))
    options = json.loads(json.dumps(dataclasses.asdict(lopt)))
    assert options["loss_decays"] == [0.5, 0.9, 0.999]  # JSON has lists
    again = HierarchicalLOpt(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    )
    assert again == lopt and again.num_meta_params == lopt.num_meta_params


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as info:
        HierarchicalLOpt(num_mix=0, mixing="max", step_mult=math.inf)
    for key in ("num_mix", "mixing", "step_mult"):
        assert key in str(info.value)
