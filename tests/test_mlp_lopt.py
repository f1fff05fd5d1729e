"""Tests of the per-parameter MLP learned optimizer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from lopt_cases import (
    EPS,
    MODEL_TREES,
    TANH_SCALES,
    assert_masked_entries_keep_state,
    perturbed_theta,
    reference_network_update,
)

from lopt.mlp_lopt import MLPLOpt
from lopt.registry import make_lopt


def _expected_count(hidden: int, layers: int, decays: int) -> int:
    """(n_per_param + n_shared)·h + h + (h·h + h)·(layers − 1) + 2h + 2."""
    n_per_param = 2 + decays + 1 + decays + 1  # p, g, momenta, rms, momenta/√rms, g/√rms
    n_shared = 3 + len(TANH_SCALES)
    return (
        (n_per_param + n_shared) * hidden
        + hidden
        + (hidden * hidden + hidden) * (layers - 1)
        + 2 * hidden
        + 2
    )


def test_meta_parameter_count_matches_the_formula_and_the_readme():
    theta = MLPLOpt().init_meta(jax.random.PRNGKey(0))
    n = sum(x.size for x in jax.tree.leaves(theta))
    # the default 4x2 with two momenta (docs/optimizers.md, "Momenta")
    assert n == _expected_count(4, 2, 2) == 98
    four = (0.5, 0.9, 0.99, 0.999)  # LOLv2's, the generalist's
    generalist = MLPLOpt(momentum_decays=four).init_meta(jax.random.PRNGKey(0))
    assert sum(x.size for x in jax.tree.leaves(generalist)) == _expected_count(4, 2, 4) == 114
    first_slice = MLPLOpt(hidden_size=32, momentum_decays=four).init_meta(jax.random.PRNGKey(0))
    # the shipped mnist1d-mlp-pes's figure in checkpoints/README.md
    assert sum(x.size for x in jax.tree.leaves(first_slice)) == _expected_count(32, 2, 4) == 1794
    other = MLPLOpt(hidden_size=8, hidden_layers=3, momentum_decays=(0.5, 0.9))
    n = sum(x.size for x in jax.tree.leaves(other.init_meta(jax.random.PRNGKey(0))))
    assert n == _expected_count(8, 3, 2)


def _reference_update(lopt, theta, p, g, m, v, step, num_steps):
    """The documented update of one tensor in float64 NumPy, written from the docstring.

    Returns the update and the new momenta [*shape, n_decays] and running mean square.
    """
    decays = np.asarray(lopt.momentum_decays, np.float64)
    m = m * decays + g[..., None] * (1.0 - decays)
    v = v * lopt.rms_decay + g**2 * (1.0 - lopt.rms_decay)
    inv = 1.0 / np.sqrt(v + EPS)
    columns = [p, g, *np.moveaxis(m, -1, 0), v, *np.moveaxis(m * inv[..., None], -1, 0), g * inv]
    u = reference_network_update(lopt, theta, columns, step, num_steps)
    return u.reshape(p.shape), m, v


@pytest.mark.parametrize(
    "lopt",
    [
        MLPLOpt(),
        MLPLOpt(
            hidden_size=8,
            hidden_layers=3,
            momentum_decays=(0.5, 0.95),
            rms_decay=0.99,
            step_mult=0.01,
            exp_mult=0.5,
        ),
        MLPLOpt(step_schedule="cosine", step_schedule_final=0.2),
    ],
    ids=["default", "3-layers", "cosine"],
)
def test_updates_match_an_independent_float64_reference(lopt):
    theta = lopt.init_meta(jax.random.PRNGKey(0))
    # Perturb every meta-parameter (biases start at zero) so each one matters.
    leaves, treedef = jax.tree.flatten(theta)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    theta = jax.tree.unflatten(
        treedef,
        [x + 0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)],
    )
    shapes = {"a": (3, 4), "b": (5,), "c": (2, 3, 2)}
    rng = np.random.default_rng(0)
    num_steps = 10
    opt = lopt.optimizer(theta)
    update = jax.jit(opt.update)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    state = opt.init(params, num_steps)
    n_decays = len(lopt.momentum_decays)
    m = {k: np.zeros(s + (n_decays,)) for k, s in shapes.items()}
    v = {k: np.zeros(s) for k, s in shapes.items()}
    for step in range(4):
        params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
        grads = {k: (2.0 * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}
        updates, state = update(grads, state, params, jnp.float32(1.0))
        for k in shapes:
            ref, m[k], v[k] = _reference_update(
                lopt,
                theta,
                np.float64(params[k]),
                np.float64(grads[k]),
                m[k],
                v[k],
                step,
                num_steps,
            )
            got = np.asarray(updates[k])
            assert got.dtype == np.float32 and got.shape == shapes[k]
            # float32 features and ≤32-wide matmuls: errors of a few 1e-7 of the tensor's
            # update scale (measured ≤ 3e-7); 1e-5 of that scale leaves a 30x margin.
            scale = np.abs(ref).max()
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * scale, err_msg=k)


@pytest.mark.parametrize("make_params", MODEL_TREES)
def test_fresh_optimizer_takes_small_finite_steps_on_any_pytree(make_params):
    params = make_params()
    # 32 units: with constant gradients every entry of a tensor has the same features, and
    # a fresh network of the default 4 units can have all its ReLUs off there (a zero step)
    lopt = MLPLOpt(hidden_size=32)
    opt = lopt.optimizer(lopt.init_meta(jax.random.PRNGKey(1)))
    state = opt.init(params, 100)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 3.0, params)
    updates, state = jax.jit(opt.update)(grads, state, params, jnp.float32(1.0))
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert u.shape == p.shape and u.dtype == p.dtype
        assert np.all(np.isfinite(u))
        # step_mult * d * exp(exp_mult * m) with O(1) outputs: about 1e-3 per parameter.
        assert 0 < np.abs(u).max() < 2e-2
    assert int(state.step) == 1


def test_non_float_leaves_are_left_alone():
    params = {"w": jnp.ones((3, 2)), "count": jnp.array(7, jnp.int32)}
    lopt = MLPLOpt()
    opt = lopt.optimizer(lopt.init_meta(jax.random.PRNGKey(0)))
    state = opt.init(params, 10)
    grads = {"w": jnp.ones((3, 2)), "count": jnp.array(0, jnp.int32)}
    updates, _ = opt.update(grads, state, params, jnp.float32(0.5))
    assert updates["count"].dtype == jnp.int32 and int(updates["count"]) == 0
    assert np.abs(updates["w"]).max() > 0


def test_update_depends_on_progress_features():
    # After one step, two runs that differ only in their horizon differ only in the
    # fraction-of-training features (1/100 vs 1/2), and so must their second updates.
    params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4)}
    lopt = MLPLOpt()
    opt = lopt.optimizer(lopt.init_meta(jax.random.PRNGKey(3)))
    grads = {"w": jnp.cos(jnp.arange(12.0)).reshape(3, 4)}
    second = []
    for horizon in (100, 2):
        u, s = opt.update(grads, opt.init(params, horizon), params, 1.0)
        second.append(opt.update(grads, s, params, 1.0)[0]["w"])
    # Relative differences far above float32 round-off (~1e-6).
    assert not np.allclose(second[0], second[1], rtol=1e-3, atol=0)


def test_per_tensor_normalisation_makes_update_scale_free_in_gradient():
    # Features are normalised per tensor: scaling every gradient by 1000 leaves the
    # first update (zero momenta history aside) unchanged.
    params = {"w": jnp.linspace(-1, 1, 20).reshape(4, 5)}
    lopt = MLPLOpt()
    opt = lopt.optimizer(lopt.init_meta(jax.random.PRNGKey(4)))
    # Gradients bounded away from zero, where the rsqrt epsilon is negligible.
    g = {"w": (1.5 + jnp.sin(jnp.arange(20.0))).reshape(4, 5)}
    s = opt.init(params, 50)
    u1, _ = opt.update(g, s, params, 1.0)
    u2, _ = opt.update(jax.tree.map(lambda x: 1000 * x, g), s, params, 1.0)
    # Only the 1e-8 epsilons are not scale-free (the rms column's mean square is ~1e-5 at
    # gradient scale 1): the float64 reference moves by 0.15 % of the update scale, so
    # allow 0.5 % of it. Without per-tensor normalisation the updates would differ by O(1).
    scale = float(np.abs(u1["w"]).max())
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=0, atol=5e-3 * scale)


def test_without_feature_norm_the_update_depends_on_the_gradient_scale():
    # The comparison switch: raw features, so scaling the gradient moves the update by O(1).
    params = {"w": jnp.linspace(-1, 1, 20).reshape(4, 5)}
    lopt = MLPLOpt(feature_norm=False)
    opt = lopt.optimizer(perturbed_theta(lopt))
    g = {"w": (1.5 + jnp.sin(jnp.arange(20.0))).reshape(4, 5)}
    s = opt.init(params, 50)
    u1 = np.asarray(opt.update(g, s, params, 1.0)[0]["w"])
    u2 = np.asarray(opt.update(jax.tree.map(lambda x: 10 * x, g), s, params, 1.0)[0]["w"])
    assert np.all(np.isfinite(u2)) and np.abs(u2 - u1).max() > 0.1 * np.abs(u1).max()


def _tree_and_grads():
    params = {
        "kernel": jnp.linspace(-1, 1, 256 * 8).reshape(256, 8),
        "conv": jnp.linspace(-1, 1, 3 * 3 * 4 * 8).reshape(3, 3, 4, 8),
        "bias": jnp.linspace(-1, 1, 8),
    }
    grads = jax.tree.map(lambda p: jnp.cos(7 * p) + 0.1, params)
    return params, grads


def test_fan_in_scaling_divides_each_matrix_update_by_its_fan_in_over_the_reference():
    params, grads = _tree_and_grads()
    theta = perturbed_theta(MLPLOpt())
    plain = MLPLOpt().optimizer(theta)
    scaled = MLPLOpt(width_scaling="fan_in", width_ref=32.0).optimizer(theta)
    s = plain.init(params, 100)
    u0, _ = plain.update(grads, s, params, 1.0)
    u1, _ = scaled.update(grads, s, params, 1.0)
    # fan-in: 256 for the dense kernel, 3·3·4 = 36 for the conv kernel; biases unchanged.
    for name, factor in (("kernel", 32 / 256), ("conv", 32 / 36), ("bias", 1.0)):
        np.testing.assert_allclose(u1[name], factor * np.asarray(u0[name]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("impl", ["fused", "matmul"])
def test_a_width_scale_cap_keeps_narrow_tensors_at_the_rules_own_step(impl):
    params, grads = _tree_and_grads()
    theta = perturbed_theta(MLPLOpt())
    plain = MLPLOpt(hidden_size=4, impl=impl).optimizer(theta)
    capped = MLPLOpt(
        hidden_size=4, width_scaling="fan_in", width_ref=64.0, width_scale_max=1.0, impl=impl
    ).optimizer(theta)
    s = plain.init(params, 100)
    u0, _ = plain.update(grads, s, params, 1.0)
    u1, _ = capped.update(grads, s, params, 1.0)
    # fan-in 256: 64/256 as without a cap; fan-in 36: 64/36 > 1, capped at 1; biases 1.
    for name, factor in (("kernel", 64 / 256), ("conv", 1.0), ("bias", 1.0)):
        np.testing.assert_allclose(u1[name], factor * np.asarray(u0[name]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("impl", ["fused", "matmul"])
def test_weight_decay_moves_every_parameter_by_minus_rate_times_schedule_times_itself(impl):
    params, grads = _tree_and_grads()
    params["half"] = jnp.ones((3, 5), jnp.bfloat16)
    grads["half"] = jnp.full((3, 5), 0.25, jnp.bfloat16)
    lopt = MLPLOpt(hidden_size=4, step_schedule="cosine", impl=impl, weight_decay=1e-2)
    theta = perturbed_theta(lopt)
    plain = dataclasses.replace(lopt, weight_decay=0.0).optimizer(theta)
    opt = lopt.optimizer(theta)
    s = opt.init(params, 100)
    s = s._replace(step=jnp.int32(50))  # half-way: the cosine schedule is at 0.5
    u, _ = opt.update(grads, s, params, 1.0)
    u_plain, _ = plain.update(grads, s, params, 1.0)
    for name in params:
        want = np.asarray(u_plain[name], np.float32) - 0.5e-2 * np.asarray(params[name], np.float32)
        tol = 1e-2 if name == "half" else 1e-5
        np.testing.assert_allclose(u[name], want, rtol=tol, atol=tol * 1e-3, err_msg=name)
        assert u[name].dtype == params[name].dtype


@pytest.mark.parametrize("impl", ["fused", pytest.param("matmul", marks=pytest.mark.slow)])
def test_rms_output_gives_every_tensor_a_step_of_rms_step_mult_times_its_scales(impl):
    params, grads = _tree_and_grads()
    params["scalar"], grads["scalar"] = jnp.float32(0.5), jnp.float32(-2.0)
    grads["zero"] = jnp.zeros((3, 4))
    params["zero"] = jnp.ones((3, 4))
    lopt = MLPLOpt(
        hidden_size=4, output_norm="rms", width_scaling="fan_in", width_ref=32.0, impl=impl
    )
    theta = perturbed_theta(lopt)
    opt = lopt.optimizer(theta)
    plain = dataclasses.replace(lopt, output_norm="none").optimizer(theta)
    s = opt.init(params, 100)
    u, _ = opt.update(grads, s, params, 1.0)
    u_plain, _ = plain.update(grads, s, params, 1.0)
    factors = {"kernel": 32 / 256, "conv": 32 / 36, "bias": 1.0, "scalar": 1.0, "zero": 32 / 3}
    for name, factor in factors.items():
        x = np.asarray(u[name], np.float64)
        rms = np.sqrt(np.mean(x**2))
        np.testing.assert_allclose(rms, lopt.step_mult * factor, rtol=1e-4, err_msg=name)
        # the same direction as the plain rule's, rescaled as a whole
        y = np.asarray(u_plain[name], np.float64).ravel()
        cos = x.ravel() @ y / (np.linalg.norm(x) * np.linalg.norm(y))
        assert cos > 1 - 1e-5, (name, cos)
    # scale-free in the gradient, like the features (gradients bounded away from zero, where
    # the features' epsilons are negligible)
    grads = jax.tree.map(lambda g: 1.5 + jnp.sin(3.0 * g), grads)
    u1, _ = opt.update(grads, s, params, 1.0)
    u2, _ = opt.update(jax.tree.map(lambda g: 1e4 * g, grads), s, params, 1.0)
    for name in factors:
        np.testing.assert_allclose(u2[name], u1[name], rtol=0, atol=5e-3 * lopt.step_mult)


def test_schedule_head_starts_at_one_and_learns_bounded_per_tensor_multipliers():
    params, grads = _tree_and_grads()
    base = perturbed_theta(MLPLOpt())
    lopt = MLPLOpt(schedule_head=8)
    theta = lopt.init_meta(jax.random.PRNGKey(0))
    assert set(theta) == set(base) | {"schedule_head"}
    n_head = sum(x.size for x in jax.tree.leaves(theta["schedule_head"]))
    assert n_head == (8 + 7) * 8 + 8 + 8 + 1  # progress + tensor features → 8 → 1
    theta = {**base, "schedule_head": theta["schedule_head"]}
    s = lopt.optimizer(theta).init(params, 100)
    ref, _ = MLPLOpt().optimizer(base).update(grads, s, params, 1.0)
    fresh, _ = lopt.optimizer(theta).update(grads, s, params, 1.0)
    for name in params:  # a fresh head's output layer is zero: multiplier exactly 1
        np.testing.assert_array_equal(fresh[name], ref[name])
    w2 = 2.0 * jax.random.normal(jax.random.PRNGKey(5), (8,))
    head = dict(theta["schedule_head"], w2=w2, b2=jnp.float32(-0.5))
    moved, _ = lopt.optimizer({**base, "schedule_head": head}).update(grads, s, params, 1.0)
    ratios = {k: np.asarray(moved[k]) / np.asarray(ref[k]) for k in params}
    for k, r in ratios.items():  # one multiplier per tensor, within e^±3
        assert np.allclose(r, r.flat[0], rtol=1e-4), k
        assert np.exp(-3) * (1 - 1e-5) <= r.flat[0] <= np.exp(3) * (1 + 1e-5), k
    assert len({round(float(r.flat[0]), 4) for r in ratios.values()}) > 1  # per tensor
    # The multiplier depends on training progress: the head can anneal.
    late = s._replace(step=jnp.int32(90))
    a, _ = lopt.optimizer({**base, "schedule_head": head}).update(grads, late, params, 1.0)
    b, _ = MLPLOpt().optimizer(base).update(grads, late, params, 1.0)
    assert not np.isclose(float(a["bias"][0] / b["bias"][0]), float(ratios["bias"].flat[0]))


def test_registry_rejects_unknown_kind_and_option():
    with pytest.raises(ValueError, match="unknown learned optimizer"):
        make_lopt("nope")
    with pytest.raises(ValueError, match="hidden_sz"):
        make_lopt("mlp", hidden_sz=3)
    assert make_lopt("mlp", hidden_size=8).hidden_size == 8


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_params_get_the_float32_update_cast_once(dtype):
    # The case: a 32×40 kernel in float16 got NaN updates in 583 of 1,280 entries,
    # because the squared gradients and the normalisation ran in float16.
    lopt = MLPLOpt()
    opt = lopt.optimizer(perturbed_theta(lopt))
    rng = np.random.default_rng(0)
    p32 = {"kernel": rng.normal(size=(32, 40)).astype(np.float32), "bias": np.zeros(40, np.float32)}
    g32 = {k: (300.0 * rng.normal(size=v.shape)).astype(np.float32) for k, v in p32.items()}
    low = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)  # noqa: E731
    p, g = low(p32), low(g32)
    updates, state = opt.update(g, opt.init(p, 100), p, jnp.float32(1.0))
    # The reference: the same (rounded) numbers in float32 throughout, cast at the end.
    up32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
    ref, ref_state = opt.update(up32(g), opt.init(up32(p), 100), up32(p), jnp.float32(1.0))
    for k in p32:
        assert updates[k].dtype == dtype and np.all(np.isfinite(np.asarray(updates[k], np.float32)))
        # Identical float32 computation, one final rounding to the low-precision type.
        np.testing.assert_array_equal(updates[k], ref[k].astype(dtype))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        assert a.dtype == b.dtype  # the state is float32 whatever the parameter dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scale", [1e20, 1e30, 3e38])
def test_huge_gradients_give_finite_updates_and_state(scale):
    # g² overflows float32 beyond ~1.8e19 (the 1e20-scaled gradients gave NaN).
    lopt = MLPLOpt()
    opt = lopt.optimizer(perturbed_theta(lopt))
    params = {"w": jnp.linspace(-1.0, 1.0, 60).reshape(6, 10)}
    state = opt.init(params, 100)
    for i in range(3):
        g = {"w": scale * jnp.sin(jnp.arange(60.0) + i).reshape(6, 10)}
        updates, state = opt.update(g, state, params, jnp.float32(1.0))
        assert np.all(np.isfinite(updates["w"]))
        assert np.abs(updates["w"]).max() < 1.0  # a step, not an explosion
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def test_non_finite_gradient_entries_get_zero_update_and_stay_out_of_the_state():
    lopt = MLPLOpt()
    opt = lopt.optimizer(perturbed_theta(lopt))
    rng = np.random.default_rng(1)
    params = {"w": rng.normal(size=(4, 5)).astype(np.float32), "b": np.zeros(5, np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}]
    state = opt.init(params, 50)
    _, state = opt.update(grads[0], state, params, jnp.float32(1.0))
    bad = {k: v.copy() for k, v in grads[0].items()}
    bad["w"][1, 2], bad["w"][3, 0], bad["b"][4] = np.nan, np.inf, -np.inf
    updates, new_state = opt.update(bad, state, params, jnp.float32(1.0))
    mask = {k: ~np.isfinite(v) for k, v in bad.items()}
    # The state's update is elementwise: every finite entry must match the state that a
    # gradient with zeros at the masked places gives, every masked entry the old state.
    zeroed = {k: np.where(mask[k], 0.0, v).astype(np.float32) for k, v in bad.items()}
    _, zero_state = opt.update(zeroed, state, params, jnp.float32(1.0))
    assert_masked_entries_keep_state(updates, new_state, state, zero_state, mask)
    # The optimizer recovers: later finite gradients give finite updates everywhere.
    updates, _ = opt.update(grads[0], new_state, params, jnp.float32(1.0))
    assert all(np.all(np.isfinite(u)) and np.all(u != 0) for u in jax.tree.leaves(updates))


def test_float0_and_integer_leaves_pass_through_as_in_optax():
    lopt = MLPLOpt()
    opt = lopt.optimizer(lopt.init_meta(jax.random.PRNGKey(0)))
    params = {"w": jnp.ones((2, 3)), "n": jnp.int32(3)}
    grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2) * p["n"], allow_int=True)(params)
    assert grads["n"].dtype == jax.dtypes.float0
    updates, state = jax.jit(opt.update)(grads, opt.init(params, 10), params, jnp.float32(1.0))
    assert updates["n"].dtype == jnp.int32 and int(updates["n"]) == 0
    new = optax.apply_updates(params, updates)
    assert int(new["n"]) == 3 and np.all(np.asarray(new["w"]) != 1.0)
    assert int(state.step) == 1


@pytest.mark.parametrize(
    "params", [{}, {"n": jnp.int32(3)}, {"a": [], "b": ()}], ids=["empty", "int", "containers"]
)
def test_trees_without_float_leaves_pass_through(params):
    lopt = MLPLOpt()
    opt = lopt.optimizer(lopt.init_meta(jax.random.PRNGKey(0)))
    updates, state = opt.update(params, opt.init(params, 10), params, jnp.float32(1.0))
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert all(int(u) == 0 for u in jax.tree.leaves(updates))
    assert int(state.step) == 1


def test_past_the_horizon_progress_saturates_and_the_update_anneals():
    # Same state except the step counter. Past num_steps the fraction features stay at 1
    # and the update is scaled by num_steps / step (before: the features extrapolated and
    # the shipped optimizer diverged).
    lopt = MLPLOpt()
    opt = lopt.optimizer(perturbed_theta(lopt))
    params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4)}
    grads = {"w": jnp.cos(jnp.arange(12.0)).reshape(3, 4)}
    state = opt.init(params, 400)

    def update_at(step):
        return np.asarray(
            opt.update(grads, state._replace(step=jnp.int32(step)), params, 1.0)[0]["w"]
        )

    at_end, before = update_at(400), update_at(300)
    for step in (401, 1000, 100_000):
        past = update_at(step)
        assert np.all(np.isfinite(past))
        # Undo the 1/t decay: what remains differs from the last in-horizon update only
        # through tanh(step/300) (< 0.14 apart), so by no more than a step inside the horizon.
        undone = past * step / 400
        assert (
            np.abs(undone - at_end).max()
            <= np.abs(before - at_end).max() + 0.5 * np.abs(at_end).max()
        )
        assert np.abs(past).max() <= np.abs(undone).max() * 400 / step * (1 + 1e-6)
    # Once tanh has saturated as well (float32 tanh(x) = 1 for x ≥ 9), updates differ only
    # by the decay: u(s) · s is constant (float32 round-off in the scale: rtol 1e-6).
    np.testing.assert_allclose(update_at(10_000) * 10_000, update_at(100_000) * 100_000, rtol=1e-6)


def test_cosine_schedule_scales_the_constant_update_from_one_to_final_and_stays():
    # Same θ and state: the cosine optimizer's update is the constant one times the schedule,
    # 1 at step 0, 0.5(1 + final) halfway, `final` at the horizon and past it (times 1/t).
    theta = perturbed_theta(MLPLOpt())
    const = MLPLOpt().optimizer(theta)
    cos = MLPLOpt(step_schedule="cosine", step_schedule_final=0.1).optimizer(theta)
    params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4)}
    grads = {"w": jnp.cos(jnp.arange(12.0)).reshape(3, 4)}
    state = const.init(params, 400)
    for step, mult in ((0, 1.0), (200, 0.55), (400, 0.1), (800, 0.1)):
        s = state._replace(step=jnp.int32(step))
        u_const = np.asarray(const.update(grads, s, params, 1.0)[0]["w"])
        u_cos = np.asarray(cos.update(grads, s, params, 1.0)[0]["w"])
        assert np.abs(u_const).max() > 0
        np.testing.assert_allclose(u_cos, mult * u_const, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"hidden_layers": 0}, "hidden_layers"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"momentum_decays": ()}, "momentum_decays"),
        ({"momentum_decays": (0.9, 1.0)}, "momentum_decays"),
        ({"rms_decay": -0.1}, "rms_decay"),
        ({"step_mult": float("nan")}, "step_mult"),
        ({"exp_mult": 0.0}, "exp_mult"),
        ({"step_schedule": "linear"}, "step_schedule"),
        ({"step_schedule_final": 1.5}, "step_schedule_final"),
        ({"width_scaling": "sqrt"}, "width_scaling"),
        ({"width_ref": 0.0}, "width_ref"),
        ({"width_scale_max": -1.0}, "width_scale_max"),
        ({"width_scale_max": float("inf")}, "width_scale_max"),
        ({"schedule_head": -1}, "schedule_head"),
        ({"output_norm": "l2"}, "output_norm"),
        ({"weight_decay": -1e-3}, "weight_decay"),
        ({"weight_decay": float("inf")}, "weight_decay"),
    ],
)
def test_meaningless_settings_are_refused_naming_the_setting(kwargs, key):
    with pytest.raises(ValueError, match=key):
        MLPLOpt(**kwargs)
