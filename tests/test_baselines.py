"""Tuned baselines: the grid, the optimizers, the choice of rate and the cache's keys."""

import json

import jax
import jax.numpy as jnp
import optax
import pytest

from evaluate.bench import baselines
from evaluate.bench.baselines import Baseline, cache_key, cache_path, lr_grid, read_cache
from evaluate.suite import select_lr

TASK = {"name": "t@100", "kind": "mlp", "steps": 100, "options": {"dataset": "mnist1d"}}


def test_grid_is_one_and_three_times_powers_of_ten():
    assert lr_grid(1e-4, 1e-1) == (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    assert lr_grid(3e-3, 1.0) == (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
    for b in baselines.DEFAULT_BASELINES + baselines.QUICK_BASELINES:
        assert len(b.lrs) >= 4


def _updates(tx, steps=3):
    params = jnp.array([1.0, -1.0, 0.5])
    state = tx.init(params)
    out = []
    for i in range(steps):
        updates, state = tx.update(jnp.array([0.3, -0.1, 0.2]) * (i + 1), state, params)
        out.append(updates)
    return jnp.stack(out)


def test_baselines_are_the_optimizers_they_name():
    adam = Baseline("adam", (1e-3,)).transform(1e-3, 100)
    assert jnp.allclose(_updates(adam), _updates(optax.adam(1e-3)))
    sgdm = Baseline("sgdm", (1e-1,)).transform(1e-1, 100)
    assert jnp.allclose(_updates(sgdm), _updates(optax.sgd(1e-1, momentum=0.9)))
    # Warm-up then cosine: the first update is zero (rate 0), then it rises.
    cos = _updates(Baseline("adam_cosine", (1e-2,)).transform(1e-2, 100), steps=6)
    norms = jnp.linalg.norm(cos, axis=1)
    assert norms[0] == 0.0 and jnp.all(jnp.diff(norms) > 0)


def test_the_rate_may_be_traced_so_a_grid_is_one_compilation():
    b = Baseline("adam", (1e-3, 1e-2))
    f = jax.jit(jax.vmap(lambda lr: _updates(b.transform(lr, 10))))
    out = f(jnp.array([1e-3, 1e-2]))
    assert jnp.allclose(out[1], 10 * out[0], rtol=1e-5)


def test_select_picks_the_best_mean_valid_loss_and_a_diverged_seed_disqualifies():
    loss = jnp.array([[1.0, 1.0], [0.5, 0.6], [0.1, jnp.nan]])
    diverged = jnp.array([[False, False], [False, False], [False, True]])
    best, score = select_lr(loss, diverged)
    assert int(best) == 1 and jnp.isinf(score[2])


def _key(**changes):
    args = {
        "task": TASK,
        "baseline": Baseline("adam", (1e-3, 1e-2)),
        "seeds": 3,
        "eval_points": 20,
        "train_bins": 100,
        "data_fingerprint": "abc",
    }
    args.update(changes)
    return cache_key(**args)


def test_cache_key_changes_with_everything_that_determines_the_result(monkeypatch):
    base = _key()
    assert _key() == base  # deterministic
    assert _key(task={**TASK, "description": "other words"}) == base  # prose is not a input
    different = [
        _key(task={**TASK, "steps": 200}),
        _key(task={**TASK, "options": {"dataset": "mnist"}}),
        _key(baseline=Baseline("adam", (1e-3, 3e-2))),
        _key(baseline=Baseline("sgdm", (1e-3, 1e-2))),
        _key(seeds=5),
        _key(eval_points=10),
        _key(train_bins=50),
        _key(data_fingerprint="abd"),
    ]
    monkeypatch.setattr(baselines, "versions", lambda: {"jax": "0.0.0"})
    different.append(_key())
    monkeypatch.setattr(baselines, "BASELINE_VERSION", baselines.BASELINE_VERSION + 1)
    assert len({base, *different, _key()}) == len(different) + 2


def test_a_corrupt_or_foreign_cache_file_is_a_miss_never_an_error(tmp_path):
    path = cache_path(tmp_path, "mlp-x@100", "adam", "k1")
    assert path.parent.name == "mlp-x_100"
    assert read_cache(path, "k1") is None  # missing
    baselines.write_json_atomic(path, {"key": "k1", "value": 1})
    assert read_cache(path, "k1") == {"key": "k1", "value": 1}
    assert read_cache(path, "k2") is None  # another key
    path.write_text('{"key": "k1", "val')  # torn
    assert read_cache(path, "k1") is None
    with pytest.raises(ValueError):
        baselines.write_json_atomic(path, {"x": float("nan")})
    assert json.loads(path.read_text() + 'ue": 1}') == {"key": "k1", "value": 1}  # untouched
