"""Tests of the evaluation suite on tiny synthetic classification problems (no dataset files)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from evaluate import suite
from lopt.export import as_optax
from lopt.mlp_lopt import MLPLOpt
from meta_train.config import EvalConfig
from tasks.classification import TaskHParams, mlp_task
from tasks.device_data import to_device

DIM = 40


def _blobs(seed: int, num_classes: int, sep: float = 3.0) -> dict:
    """Gaussian blobs around random class centres: (nearly) linearly separable for large sep."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, DIM)) * sep * 2 / np.sqrt(DIM)

    def make(n):
        y = rng.integers(0, num_classes, n)
        return (centres[y] + rng.normal(size=(n, DIM))).astype(np.float32), y.astype(np.int32)

    return {"train": make(256), "valid": make(128), "test": make(128)}


def _task(seed: int, num_classes: int = 10, init_scale: float = 1.0):
    hp = TaskHParams(jnp.int32(0), jnp.int32(0), jnp.float32(init_scale))
    return mlp_task(to_device([_blobs(seed, num_classes)]), [32], num_classes, batch_size=32, hp=hp)


class _Family:
    """The part of a task family `run_suite` uses."""

    def __init__(self):
        self.seen = []

    def sample_with_info(self, key):
        seed = int(jax.random.randint(key, (), 0, 1000))
        self.seen.append(seed)
        return _task(seed), {"dataset": f"blobs{seed}", "activation": "relu"}


def test_eval_steps():
    assert suite.eval_steps(100, 10) == list(range(0, 101, 10))
    assert suite.eval_steps(25, 10) == [0, 10, 20, 25]
    assert suite.eval_steps(5, 0) == [0, 5]


def test_train_sgd_lowers_loss():
    task = _task(0, num_classes=2)
    r = suite.train(task, optax.sgd(0.1), 60, jax.random.PRNGKey(0), 25)
    assert r["train_curve"].shape == (60,)
    assert r["valid_curve"].shape == (len(suite.eval_steps(60, 25)),)
    assert not bool(r["diverged"])
    # Separable problem: the loss falls well below its start and the test set is solved.
    assert float(r["final_train_loss"]) < 0.5 * float(r["train_curve"][0])
    assert float(r["valid_curve"][-1]) < float(r["valid_curve"][0])
    np.testing.assert_allclose(r["valid_curve"][-1], r["final_valid_loss"], rtol=1e-5)
    assert float(r["final_test_accuracy"]) > 0.9


def test_train_divergence_is_flagged_not_raised():
    task = _task(0, init_scale=10.0)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    r = suite.train_seeds(task, optax.sgd(1e6), 30, keys, 10)
    assert r["train_curve"].shape == (2, 30)
    assert np.asarray(r["diverged"]).all()
    assert not np.isfinite(np.asarray(r["final_valid_loss"])).any()


def test_select_lr_counts_diverged_as_inf():
    loss = jnp.array([[0.5, 0.5], [0.1, 0.1], [0.3, jnp.nan]])
    diverged = jnp.array([[False, False], [True, False], [False, False]])
    best, score = suite.select_lr(loss, diverged)
    assert int(best) == 0
    assert np.isinf(np.asarray(score)[1:]).all()


def test_adam_grid_picks_best_lr_and_matches_separate_runs():
    task = _task(1)
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    lrs = (1e-6, 1e-2)
    g = suite.tune_adam(task, jnp.asarray(lrs), 40, keys, 20)
    assert g["grid"]["final_valid_loss"].shape == (2, 2)
    assert float(g["best_lr"]) == pytest.approx(1e-2)  # a tiny rate obviously loses
    # Each rate alone (a one-rate grid: one more compilation serves both): same losses,
    # same choice.
    alone = [suite.tune_adam(task, jnp.asarray([lr]), 40, keys, 20) for lr in lrs]
    alone = [np.asarray(a["grid"]["final_valid_loss"][0]) for a in alone]
    np.testing.assert_allclose(np.stack(alone), g["grid"]["final_valid_loss"], rtol=2e-3)
    assert int(np.argmin([a.mean() for a in alone])) == int(g["best_index"])
    np.testing.assert_allclose(g["best"]["final_test_loss"], g["grid"]["final_test_loss"][1])


def test_run_suite_writes_results(tmp_path):
    lopt = MLPLOpt()
    theta = lopt.init_meta(jax.random.PRNGKey(0))
    config = EvalConfig(
        num_tasks=2, num_seeds=2, num_steps=40, adam_lrs=(1e-3, 1e-2), eval_every=20
    )
    family = _Family()
    res = suite.run_suite(
        family,
        {"learned": lambda n: as_optax(lopt, theta, n)},
        config,
        jax.random.PRNGKey(1),
        str(tmp_path),
        horizon=1000,
    )
    assert len(family.seen) == 2
    assert isinstance(res["warnings"], list)  # e.g. an Adam rate at the edge of the grid
    for name in ("results.json", "results.md", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0

    loaded = json.loads((tmp_path / "results.json").read_text())
    assert loaded["optimizers"] == ["learned", "adam", "adam_train"]
    assert loaded["config"]["num_steps"] == 40  # config.num_steps wins over horizon
    assert len(loaded["tasks"]) == 2
    for t in loaded["tasks"]:
        learned = t["optimizers"]["learned"]["seeds"]
        assert len(learned["final_test_accuracy"]) == 2
        assert len(learned["train_curve"]) == 2 and len(learned["train_curve"][0]) == 40
        assert len(learned["valid_curve"][0]) == len(loaded["eval_steps"]) == 3
        adam = t["optimizers"]["adam"]
        assert adam["lr"] in config.adam_lrs
        assert [e["lr"] for e in adam["grid"]] == list(config.adam_lrs)
        assert all(len(e["seeds"]["final_valid_loss"]) == 2 for e in adam["grid"])
        best_score = min(e["score"] for e in adam["grid"] if e["score"] is not None)
        assert adam["grid"][adam["lr_index"]]["score"] == best_score
        train_means = [sum(e["seeds"]["final_train_loss"]) for e in adam["grid"]]
        best_train = train_means.index(min(train_means))
        assert t["optimizers"]["adam_train"]["lr"] == adam["grid"][best_train]["lr"]
    for name in ("learned", "adam"):
        s = loaded["summary"][name]
        assert s["runs"] == 4
        assert math.isfinite(s["final_test_accuracy"]["mean"])

    table = res["table"]
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert len(lines) == 4  # header + one row per optimizer (learned, adam, adam_train)
    assert lines[1].startswith("| learned |")
    assert lines[2].startswith("| adam (tuned, lr=")
    assert lines[3].startswith("| adam (tuned on train loss, lr=")
    assert "±" in lines[1] and lines[1].count(" ± ") == 5
    assert table in (tmp_path / "results.md").read_text()
    assert suite.format_table(loaded) == table


def test_format_table_shows_divergence():
    nan = {"mean": None, "std": None, "all_finite": False}
    ok = {"mean": 1.0, "std": 0.5, "all_finite": True}
    summ = {k: ok for k in suite._FINAL_KEYS} | {"diverged": 0, "runs": 3}
    bad = {k: nan for k in suite._FINAL_KEYS} | {"diverged": 1, "runs": 3}
    results = {
        "optimizers": ["good", "bad"],
        "labels": {"good": "good", "bad": "bad"},
        "summary": {"good": summ, "bad": bad},
    }
    table = suite.format_table(results)
    assert "| good | 1.0000 ± 0.5000 |" in table
    assert "nan (diverged)" in table and "| 1/3 |" in table


def test_tasks_given_as_pairs_are_all_used():
    pairs = [("task-a", {"name": "a"}), ("task-b", {"name": "b"})]
    got = suite._sample_tasks(pairs, num_tasks=5, key=jax.random.PRNGKey(0))
    assert [info["name"] for _, info in got] == ["a", "b"]
