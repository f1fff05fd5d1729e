"""Optimizer SPECs of the benchmark: every accepted form, and clear errors for bad ones."""

import bench_optimizers
import jax
import jax.numpy as jnp
import optax
import pytest

from evaluate.bench.specs import SpecError, check, parse_spec, shipped_names
from lopt.hub import shipped_dir


def _one_update(tx, loss=1.0):
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    tx = optax.with_extra_args_support(tx)
    updates, _ = tx.update(grads, state, params, loss=jnp.float32(loss))
    return updates["w"]


def test_optax_spec_with_literal_arguments_builds_that_optimizer():
    s = parse_spec("optax:adam(learning_rate=1e-3, b1=0.8)")
    assert (s.kind, s.target) == ("optax", "adam")
    assert dict(s.kwargs) == {"learning_rate": 1e-3, "b1": 0.8}
    assert s.label == "optax:adam(learning_rate=1e-3, b1=0.8)"
    expected = _one_update(optax.adam(1e-3, b1=0.8))
    assert jnp.allclose(_one_update(s.make(100)), expected)
    assert parse_spec("optax:sgd(0.1)").args == (0.1,)


def test_labels_name_rows_and_do_not_swallow_keyword_arguments():
    s = parse_spec("fast=optax:sgd(learning_rate=0.1)")
    assert s.label == "fast" and s.spec == "optax:sgd(learning_rate=0.1)"


def test_module_function_specs_get_the_horizon_when_they_take_it():
    s = parse_spec("bench_optimizers:clipped_adam(learning_rate=1e-2)")
    assert s.kind == "function"
    assert jnp.allclose(_one_update(s.make(50)), _one_update(bench_optimizers.clipped_adam(1e-2)))
    parse_spec("bench_optimizers:horizon_cosine").make(123)
    assert bench_optimizers.horizon_cosine.last_num_steps == 123


def test_a_tasks_steps_per_epoch_reaches_shipped_optimizers_and_functions_that_name_it():
    parse_spec("bench_optimizers:data_aware").make(10, steps_per_epoch=28.0)
    assert bench_optimizers.data_aware.last_steps_per_epoch == 28.0
    parse_spec("bench_optimizers:any_keywords").make(10, steps_per_epoch=28.0)
    assert bench_optimizers.any_keywords.last_kwargs == {"num_steps": 10}
    # the shipped generalist spreads its decay per epoch over the task's steps per epoch
    shipped = parse_spec("generalist")
    fixed, spread = shipped.make(100), shipped.make(100, steps_per_epoch=28.0)
    assert not jnp.allclose(_one_update(fixed), _one_update(spread))


def test_shipped_names_and_checkpoint_dirs_build_the_learned_optimizer():
    assert "mnist1d-mlp-pes" in shipped_names()
    by_name = parse_spec("mnist1d-mlp-pes")
    by_dir = parse_spec(str(shipped_dir() / "mnist1d-mlp-pes"))
    assert (by_name.kind, by_dir.kind) == ("shipped", "checkpoint")  # by name: hash-checked
    # An extra-args transformation: it needs the loss, which the benchmark passes.
    u1, u2 = _one_update(by_name.make(200)), _one_update(by_dir.make(200))
    assert jnp.all(jnp.isfinite(u1)) and jnp.allclose(u1, u2)
    assert jax.tree.leaves(u1)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("adam", "not a checkpoint directory, a shipped optimizer"),
        ("/no/such/dir", "not a checkpoint directory"),
        ("optax:adamm(learning_rate=1e-3)", "optax has no 'adamm'"),
        ("optax:adam(learning_rate=lr)", "must be Python literals"),
        ("optax:adam(learning_rate=1e-3", "not a checkpoint directory"),
        ("optax:adam(**kw)", "not allowed"),
        ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
        ("bench_optimizers:missing", "has no function 'missing'"),
    ],
)
def test_bad_specs_fail_with_a_message(text, message):
    with pytest.raises(SpecError, match=message):
        check(parse_spec(text))


def test_builders_that_fail_or_return_something_else_are_spec_errors():
    with pytest.raises(SpecError, match="returned int, not an optax GradientTransformation"):
        check(parse_spec("bench_optimizers:not_a_transformation"))
    with pytest.raises(SpecError, match="calling adam failed"):
        check(parse_spec("optax:adam(nonsense=1)"))


def test_a_directory_that_is_not_a_checkpoint_fails_when_built(tmp_path):
    with pytest.raises(SpecError, match="could not be built"):
        check(parse_spec(str(tmp_path)))
