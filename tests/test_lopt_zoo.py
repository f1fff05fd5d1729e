"""The contract every learned optimizer of the zoo keeps, checked on every registered kind.

Each kind's own test file checks its update rule; this one checks what users and the rest of
the system rely on whatever the kind: any pytree (flax linen, flax nnx, haiku, integer
leaves), finite updates for zero, tiny and huge gradients, jit, vmap over particles,
determinism, the optax export, and checkpoints that load with `load_optax`.
"""

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from lopt_cases import perturbed_theta

from lopt.export import as_optax, load_optax
from lopt.registry import LOPTS, make_lopt
from meta_train.checkpoint import Checkpointer
from meta_train.config import Config, LOptConfig

KINDS = sorted(LOPTS)


def _linen_params():
    model = nn.Sequential([nn.Conv(4, (3, 3)), nn.relu, lambda x: x.reshape(-1), nn.Dense(3)])
    return model.init(jax.random.PRNGKey(0), jnp.ones((5, 5, 2)))


def _haiku_params():
    f = hk.transform(lambda x: hk.nets.MLP([8, 3])(x))
    return f.init(jax.random.PRNGKey(0), jnp.ones((2, 5)))


def _nnx_state():
    model = nnx.Sequential(nnx.Linear(5, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
    return nnx.state(model, nnx.Param)


def _with_counter(params):
    """Nested tree with an integer leaf (a step counter) and a scalar, as users' states have."""
    return {"model": params, "count": jnp.int32(7), "scale": jnp.float32(0.5)}


TREES = {"linen": _linen_params, "haiku": _haiku_params, "nnx": _nnx_state}
# Each kind's own tests cover haiku and nnx trees too; here they run in the slow stage.
TREE_PARAMS = [
    pytest.param(name, marks=() if name == "linen" else pytest.mark.slow) for name in sorted(TREES)
]


def _grads_like(params, scale, seed=0):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = []
    for k, x in zip(keys, leaves, strict=True):
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.floating):
            out.append((scale * jax.random.normal(k, x.shape)).astype(x.dtype))
        else:
            out.append(jnp.zeros_like(x))
    return jax.tree.unflatten(treedef, out)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tree", TREE_PARAMS)
def test_any_pytree_gets_updates_of_its_shapes_and_dtypes(kind, tree):
    lopt = make_lopt(kind)
    params = _with_counter(TREES[tree]())
    opt = lopt.optimizer(perturbed_theta(lopt, scale=0.1))
    state = opt.init(params, 50)
    updates, state = jax.jit(opt.update)(_grads_like(params, 1.0), state, params, 1.0)
    flat_p = jax.tree.leaves(params)
    flat_u = jax.tree.leaves(updates)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for p, u in zip(flat_p, flat_u, strict=True):
        p = jnp.asarray(p)
        assert u.shape == p.shape and u.dtype == p.dtype
        assert np.all(np.isfinite(np.asarray(u, np.float64)))
    assert int(updates["count"]) == 0  # integer leaves are left alone
    assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates["model"]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e30])
def test_zero_tiny_and_huge_gradients_give_finite_updates_and_state(kind, scale):
    lopt = make_lopt(kind)
    params = _linen_params()
    opt = lopt.optimizer(perturbed_theta(lopt, scale=0.1))
    state = opt.init(params, 20)
    update = jax.jit(opt.update)
    for step in range(3):
        grads = _grads_like(params, scale, seed=step)
        updates, state = update(grads, state, params, jnp.float32(2.0 - 0.1 * step))
        for x in jax.tree.leaves((updates, state)):
            assert np.all(np.isfinite(np.asarray(x, np.float64))), (kind, scale, step)
        params = optax.apply_updates(params, updates)


@pytest.mark.slow  # one vmapped and two single compilations per kind (~13 s in all)
@pytest.mark.parametrize("kind", KINDS)
def test_vmap_over_particles_matches_one_by_one_and_is_deterministic(kind):
    lopt = make_lopt(kind)
    thetas = [perturbed_theta(lopt, seed, scale=0.1) for seed in (0, 10)]
    params = _haiku_params()
    grads = [_grads_like(params, 1.0, seed) for seed in (3, 4)]
    losses = jnp.asarray([1.0, 2.0])

    def one(theta, g, loss):
        opt = lopt.optimizer(theta)
        state = opt.init(params, 30)
        u, state = opt.update(g, state, params, loss)
        return opt.update(g, state, optax.apply_updates(params, u), loss)

    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
    batched = jax.jit(jax.vmap(one))(stack(thetas), stack(grads), losses)
    again = jax.jit(jax.vmap(one))(stack(thetas), stack(grads), losses)
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    for i in range(2):
        single = jax.jit(one)(thetas[i], grads[i], losses[i])
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(single), strict=True):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_state_can_be_donated_as_training_loops_do(kind):
    # Two state leaves sharing one buffer make XLA refuse a donated state.
    lopt = make_lopt(kind)
    params = _linen_params()
    opt = lopt.optimizer(perturbed_theta(lopt, scale=0.1))
    state = opt.init(params, 10)
    step = jax.jit(lambda g, s, p: opt.update(g, s, p, jnp.float32(1.0)), donate_argnums=1)
    for _ in range(2):
        _, state = step(_grads_like(params, 1.0), state, params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("kind", KINDS)
def test_a_state_of_other_params_fails_clearly(kind):
    lopt = make_lopt(kind)
    opt = lopt.optimizer(lopt.init_meta(jax.random.PRNGKey(0)))
    params = {"w": jnp.ones((2, 3))}
    state = opt.init(params, 10)
    with pytest.raises(ValueError):  # gradients of another tree than the params
        opt.update({"v": jnp.ones((2, 3))}, state, params, 1.0)
    two = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    with pytest.raises(ValueError, match="init the state with these params"):
        opt.update(two, state, two, 1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_horizon_below_one_is_rejected(kind):
    lopt = make_lopt(kind)
    opt = lopt.optimizer(lopt.init_meta(jax.random.PRNGKey(0)))
    params = {"w": jnp.ones((2, 3))}
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="num_steps"):
            opt.init(params, bad)
        with pytest.raises(ValueError, match="num_steps"):
            as_optax(lopt, lopt.init_meta(jax.random.PRNGKey(0)), bad).init(params)
    opt.init(params, 1)
    opt.init(params, np.int64(7))
    jax.vmap(lambda n: opt.init(params, n))(jnp.array([3, 4]))  # traced: the schedules clamp


@pytest.mark.parametrize("kind", KINDS)
def test_export_composes_in_chain_and_rejects_a_missing_loss(kind):
    lopt = make_lopt(kind)
    theta = perturbed_theta(lopt, scale=0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), as_optax(lopt, theta, 10))
    params = _nnx_state()
    state = tx.init(params)
    update = jax.jit(lambda g, s, p, loss: tx.update(g, s, p, loss=loss))
    u, state = update(_grads_like(params, 1.0), state, params, jnp.float32(1.0))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(u))
    with pytest.raises(ValueError, match="loss"):
        tx.update(_grads_like(params, 1.0), state, params)


@pytest.mark.slow  # orbax save and restore per kind (~22 s in all)
@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_of_every_kind_loads_with_load_optax(kind, tmp_path):
    lopt = make_lopt(kind)
    theta = perturbed_theta(lopt, scale=0.1)
    config = Config(lopt=LOptConfig(kind))
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(3, theta, {"step": jnp.int32(3)}, config.to_dict())
    tx, loaded, rebuilt = load_optax(str(tmp_path / "checkpoints"), num_steps=10)
    assert type(rebuilt) is type(lopt) and rebuilt == lopt
    for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
    params = _haiku_params()
    u, _ = tx.update(_grads_like(params, 1.0), tx.init(params), params, loss=jnp.float32(1.0))
    want, _ = as_optax(lopt, theta, 10).update(
        _grads_like(params, 1.0), as_optax(lopt, theta, 10).init(params), params, loss=1.0
    )
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
