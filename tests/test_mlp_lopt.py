"""Tests of the per-parameter MLP learned optimizer."""

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lopt.mlp_lopt import MLPLOpt
from lopt.registry import make_lopt


def test_meta_parameter_count_matches_reference_size():
    theta = MLPLOpt().init_meta(jax.random.PRNGKey(0))
    n = sum(x.size for x in jax.tree.leaves(theta))
    assert 1700 <= n <= 1900  # "about 1,800" for two hidden layers of 32


def _flax_params():
    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(3)])
    return model.init(jax.random.PRNGKey(0), jnp.ones((2, 5)))["params"]


def _haiku_params():
    f = hk.transform(lambda x: hk.nets.MLP([16, 3])(x))
    return f.init(jax.random.PRNGKey(0), jnp.ones((2, 5)))


def _nnx_state():
    model = nnx.Sequential(nnx.Linear(5, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 3, rngs=nnx.Rngs(1)))
    return nnx.state(model, nnx.Param)


@pytest.mark.parametrize("make_params", [_flax_params, _haiku_params, _nnx_state])
def test_fresh_optimizer_takes_small_finite_steps_on_any_pytree(make_params):
    params = make_params()
    lopt = MLPLOpt()
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
    params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4)}
    lopt = MLPLOpt()
    opt = lopt.optimizer(lopt.init_meta(jax.random.PRNGKey(3)))
    grads = {"w": jnp.cos(jnp.arange(12.0)).reshape(3, 4)}
    s = opt.init(params, 100)
    u0, _ = opt.update(grads, s, params, 1.0)
    u1, _ = opt.update(grads, s._replace(step=jnp.int32(90)), params, 1.0)
    assert not np.allclose(u0["w"], u1["w"])


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
    np.testing.assert_allclose(
        u1["w"], u2["w"], rtol=2e-3, atol=1e-6
    )  # float32 round-off near zero


def test_registry_rejects_unknown_kind_and_option():
    with pytest.raises(ValueError, match="unknown learned optimizer"):
        make_lopt("nope")
    with pytest.raises(ValueError, match="hidden_sz"):
        make_lopt("mlp", hidden_sz=3)
    assert make_lopt("mlp", hidden_size=8).hidden_size == 8
