"""The optax export gives the optimizer's own updates and works in users' loops."""

import dataclasses

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lopt.export import as_optax, scale_by_learned
from lopt.mlp_lopt import MLPLOpt


def _problem():
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 6))
    y = (x[:, 0] > 0).astype(jnp.int32)
    return x, y


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_export_gives_same_updates_as_the_optimizer():
    lopt = MLPLOpt()
    theta = lopt.init_meta(jax.random.PRNGKey(1))
    model = nn.Dense(2)
    x, y = _problem()
    params = model.init(jax.random.PRNGKey(2), x)

    def loss_fn(p):
        return _xent(model.apply(p, x), y)

    opt = lopt.optimizer(theta)
    tx = as_optax(lopt, theta, num_steps=20)
    s_direct, s_tx = opt.init(params, 20), tx.init(params)
    p_direct = p_tx = params
    for _ in range(5):
        l1, g1 = jax.value_and_grad(loss_fn)(p_direct)
        u1, s_direct = opt.update(g1, s_direct, p_direct, l1)
        p_direct = optax.apply_updates(p_direct, u1)
        l2, g2 = jax.value_and_grad(loss_fn)(p_tx)
        u2, s_tx = tx.update(g2, s_tx, p_tx, loss=l2)
        p_tx = optax.apply_updates(p_tx, u2)
        # The export calls the same update function on the same inputs: bit-identical.
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            np.testing.assert_array_equal(a, b)


def test_export_composes_in_chain_and_needs_loss_and_params():
    lopt = MLPLOpt()
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), as_optax(lopt, lopt.init_meta(jax.random.PRNGKey(0)), 10)
    )
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    params = {"w": jnp.ones((3,))}
    state = tx.init(params)
    u, _ = tx.update({"w": jnp.ones((3,))}, state, params, loss=jnp.float32(1.0))
    assert np.all(np.isfinite(u["w"]))
    with pytest.raises(ValueError, match="loss"):
        tx.update({"w": jnp.ones((3,))}, state, params)
    with pytest.raises(ValueError, match="params"):
        tx.update({"w": jnp.ones((3,))}, state, loss=1.0)


def test_haiku_model_trains_with_exported_optimizer():
    # Meta-parameters are untrained, so only check that a haiku model runs through jit with
    # the export, stays finite and its loss does not blow up.
    x, y = _problem()
    f = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([16, 2])(x)))
    params = f.init(jax.random.PRNGKey(0), x)
    lopt = MLPLOpt()
    tx = as_optax(lopt, lopt.init_meta(jax.random.PRNGKey(1)), num_steps=50)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(lambda p: _xent(f.apply(p, x), y))(params)
        u, state = tx.update(g, state, params, loss=loss)
        return optax.apply_updates(params, u), state, loss

    losses = []
    for _ in range(50):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] * 1.5


def _scale_setup():
    lopt = MLPLOpt(hidden_size=4, step_schedule="cosine")
    theta = lopt.init_meta(jax.random.PRNGKey(0))
    params = {"w": jnp.ones((5, 3)), "b": jnp.zeros(3), "h": jnp.ones((2, 2), jnp.float16)}
    grads = {"w": jnp.full((5, 3), 0.3), "b": jnp.full(3, -0.2), "h": jnp.ones((2, 2), jnp.float16)}
    return lopt, theta, params, grads


def test_scale_by_learned_sets_each_tensors_rms_to_the_learning_rate():
    lopt, theta, params, grads = _scale_setup()
    tx = optax.chain(scale_by_learned(lopt, theta, 100), optax.scale_by_learning_rate(1e-2))
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params, loss=jnp.float32(1.0))
        for name, u in updates.items():
            rms = float(jnp.sqrt(jnp.mean(jnp.square(u.astype(jnp.float32)))))
            np.testing.assert_allclose(rms, 1e-2, rtol=1e-3, err_msg=name)
            assert u.dtype == params[name].dtype
    # It descends: the step is against the gradient, as as_optax's is.
    ref, _ = as_optax(lopt, theta, 100).update(
        grads, as_optax(lopt, theta, 100).init(params), params, loss=jnp.float32(1.0)
    )
    assert float(jnp.sum(updates["w"] * ref["w"])) > 0


def test_scale_by_learned_without_normalising_reproduces_the_rule_at_its_step_mult():
    lopt, theta, params, grads = _scale_setup()
    tx = optax.chain(
        scale_by_learned(lopt, theta, 100, normalise="none"),
        optax.scale_by_learning_rate(lopt.step_mult),
    )
    constant = dataclasses.replace(lopt, step_schedule="constant")
    ref = as_optax(constant, theta, 100)
    (u1, _), (u2, _) = (
        tx.update(grads, tx.init(params), params, loss=jnp.float32(1.0)),
        ref.update(grads, ref.init(params), params, loss=jnp.float32(1.0)),
    )
    for name in params:
        # A float16 step this small is subnormal: one unit in its last place is 6e-8.
        ulp = float(jnp.finfo(params[name].dtype).smallest_subnormal)
        np.testing.assert_allclose(
            np.asarray(u1[name], np.float32), np.asarray(u2[name], np.float32), rtol=1e-3, atol=ulp
        )
    with pytest.raises(ValueError, match="normalise"):
        scale_by_learned(lopt, theta, 100, normalise="l2")


def test_scale_by_learned_composes_with_weight_decay_and_a_schedule():
    lopt, theta, params, grads = _scale_setup()
    schedule = optax.cosine_decay_schedule(1e-2, 10)
    tx = optax.chain(
        scale_by_learned(lopt, theta, 10),
        optax.add_decayed_weights(1e-2),
        optax.scale_by_learning_rate(schedule),
    )
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, loss=jnp.float32(1.0)))
    sizes = []
    for _ in range(10):
        updates, state = step(grads, state, params)
        sizes.append(float(jnp.sqrt(jnp.mean(jnp.square(updates["b"])))))
    assert sizes[0] > sizes[5] > sizes[9]  # the schedule sets the size
