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
from tasks.language import lm_task
from tasks.text import TextCorpus, split_blocks

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
    assert float(r["final_test_accuracy"]) > 0.9


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def test_train_records_the_numbers_of_an_independent_reference():
    # Zero initial weights make the MLP a bias-only model (hidden units stay at act(0) = 0,
    # so only the output bias b gets gradients), and a training split of copies of one
    # example makes every batch the same: SGD is b ← b − lr·(softmax(b) − onehot(y₀)),
    # whatever the keys. The reference replays it in float64.
    classes, y0, lr, steps, every = 3, 2, 0.5, 60, 25
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, DIM)).astype(np.float32)
    valid_y = np.array([0, 1, 2, 2, 1, 2], np.int32)
    test_y = np.array([2, 0, 2, 1, 2], np.int32)
    splits = {
        "train": (np.repeat(x[:1], 8, axis=0), np.full(8, y0, np.int32)),
        "valid": (rng.normal(size=(6, DIM)).astype(np.float32), valid_y),
        "test": (rng.normal(size=(5, DIM)).astype(np.float32), test_y),
    }
    hp = TaskHParams(jnp.int32(0), jnp.int32(0), jnp.float32(0.0))
    task = mlp_task(to_device([splits]), [16], classes, batch_size=4, hp=hp)
    r = suite.train(task, optax.sgd(lr), steps, jax.random.PRNGKey(0), every)

    b = np.zeros(classes)
    train_curve, valid_curve = [], {}
    for t in range(steps + 1):
        p = _softmax(b)
        valid_curve[t] = -np.mean(np.log(p[valid_y]))
        if t == steps:
            break
        train_curve.append(-np.log(p[y0]))
        b = b - lr * (p - np.eye(classes)[y0])
    p = _softmax(b)
    # 60 float32 SGD steps of a 3-way softmax against float64: rounding of ~1e-7 per step
    # accumulates to well under 1e-5 relative.
    tol = dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["train_curve"], train_curve, **tol)
    expected_valid = [valid_curve[t] for t in suite.eval_steps(steps, every)]
    np.testing.assert_allclose(r["valid_curve"], expected_valid, **tol)
    np.testing.assert_allclose(r["final_valid_loss"], expected_valid[-1], **tol)
    np.testing.assert_allclose(r["final_train_loss"], -np.log(p[y0]), **tol)
    np.testing.assert_allclose(r["final_test_loss"], -np.mean(np.log(p[test_y])), **tol)
    np.testing.assert_allclose(r["mean_train_loss"], np.mean(train_curve), **tol)
    # The model predicts y₀ everywhere: accuracy is the share of y₀ labels (a ratio of
    # small counts, computed in float32: rounding only).
    np.testing.assert_allclose(r["final_test_accuracy"], np.mean(test_y == y0), rtol=1e-6)
    np.testing.assert_allclose(r["final_valid_accuracy"], np.mean(valid_y == y0), rtol=1e-6)
    assert not bool(r["diverged"])


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
    # A tiny rate obviously loses; best_lr is the float32 copy of 1e-2 (rel 6e-8 < 1e-6).
    assert float(g["best_lr"]) == pytest.approx(1e-2, rel=1e-6)
    # Each rate alone (a one-rate grid: one more compilation serves both): same losses,
    # same choice.
    alone = [suite.tune_adam(task, jnp.asarray([lr]), 40, keys, 20) for lr in lrs]
    alone = [np.asarray(a["grid"]["final_valid_loss"][0]) for a in alone]
    # vmapped over 2 rates instead of 1, XLA may order float32 reductions differently, and
    # Adam's g/√v amplifies rounding in tiny gradients over 40 steps (3e-7 measured here):
    # 2e-3 leaves room for other CPUs and is far below the gap between the rates' losses.
    np.testing.assert_allclose(np.stack(alone), g["grid"]["final_valid_loss"], rtol=2e-3)
    assert int(np.argmin([a.mean() for a in alone])) == int(g["best_index"])
    # "best" is the chosen grid entry itself (a gather): bit-identical.
    np.testing.assert_array_equal(g["best"]["final_test_loss"], g["grid"]["final_test_loss"][1])


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
        for e in adam["grid"]:
            # Mean over seeds of float32 numbers, stored as their shortest decimals: 1e-6.
            assert e["score"] == pytest.approx(np.mean(e["seeds"]["final_valid_loss"]), rel=1e-6)
        best_score = min(e["score"] for e in adam["grid"] if e["score"] is not None)
        assert adam["grid"][adam["lr_index"]]["score"] == best_score
        # The reported Adam runs are the chosen grid entries themselves (copied, not redone).
        assert adam["seeds"] == adam["grid"][adam["lr_index"]]["seeds"]
        train_means = [sum(e["seeds"]["final_train_loss"]) for e in adam["grid"]]
        best_train = train_means.index(min(train_means))
        assert t["optimizers"]["adam_train"]["lr"] == adam["grid"][best_train]["lr"]
        assert t["optimizers"]["adam_train"]["seeds"] == adam["grid"][best_train]["seeds"]
    _check_summaries_against_per_seed_numbers(loaded)

    table = res["table"]
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert len(lines) == 4  # header + one row per optimizer (learned, adam, adam_train)
    assert lines[1].startswith("| learned |")
    assert lines[2].startswith("| adam (tuned, lr=")
    assert lines[3].startswith("| adam (tuned on train loss, lr=")
    assert "±" in lines[1] and lines[1].count(" ± ") == 5
    assert table in (tmp_path / "results.md").read_text()
    assert suite.format_table(loaded) == table


FINAL_METRICS = (
    "mean_train_loss",
    "final_train_loss",
    "final_train_accuracy",
    "final_valid_loss",
    "final_valid_accuracy",
    "final_test_loss",
    "final_test_accuracy",
)
# The table's columns, in order (README: mean train loss, train, valid, test loss, test acc).
TABLE_COLUMNS = (
    "mean_train_loss",
    "final_train_loss",
    "final_valid_loss",
    "final_test_loss",
    "final_test_accuracy",
)


def _table_rows(results: dict) -> dict[str, list[str]]:
    """The cells of each optimizer's row of the summary table."""
    lines = [ln for ln in suite.format_table(results).splitlines() if ln.startswith("| ")][1:]
    rows = {}
    for name, line in zip(results["optimizers"], lines, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == results["labels"][name]
        rows[name] = cells[1:]
    return rows


def _check_summaries_against_per_seed_numbers(results: dict) -> None:
    """Recomputes every summary (mean ± population std over tasks × seeds, diverged runs)
    from the per-seed numbers in results.json, and the table from the summaries."""
    for name in results["optimizers"]:
        per_task = [t["optimizers"][name] for t in results["tasks"]]
        pools = [[opt] for opt in per_task] + [per_task]  # each task's summary, then all
        summaries = [opt["summary"] for opt in per_task] + [results["summary"][name]]
        for pool, summary in zip(pools, summaries, strict=True):
            diverged = sum(sum(opt["seeds"]["diverged"]) for opt in pool)
            runs = sum(len(opt["seeds"]["diverged"]) for opt in pool)
            assert (summary["diverged"], summary["runs"]) == (diverged, runs), name
            for key in FINAL_METRICS:
                v = np.concatenate([opt["seeds"][key] for opt in pool]).astype(np.float64)
                # The stored per-seed numbers are float32 values written as their shortest
                # decimals (within 6e-8 relative), the summary used the float32 values: 1e-6
                # relative, and 1e-7 absolute for a std of (nearly) zero.
                got = summary[key]
                assert got["mean"] == pytest.approx(np.mean(v), rel=1e-6, abs=1e-7), (name, key)
                assert got["std"] == pytest.approx(np.std(v), rel=1e-6, abs=1e-7), (name, key)
                assert got["all_finite"] is True
    rows = _table_rows(results)
    for name in results["optimizers"]:
        s = results["summary"][name]
        cells = [f"{s[k]['mean']:.4f} ± {s[k]['std']:.4f}" for k in TABLE_COLUMNS]
        assert rows[name] == cells + [f"{s['diverged']}/{s['runs']}"], name


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


def _lm_task():
    # 1,800 bytes: valid and test splits of 90 bytes, 11 windows of 8 + 1 bytes each.
    text = b"the quick brown fox jumps over the lazy dog. " * 40
    corpus = TextCorpus("tiny", split_blocks(np.frombuffer(text, np.uint8)), "test")
    return lm_task(corpus, "rnn", hidden=8, batch_size=4, seq_len=8)


@pytest.mark.slow  # keeps the default stage under 10 minutes (it took 9 min 57 s)
def test_run_suite_mixing_kinds_gives_one_table_per_kind(tmp_path):
    pairs = [
        (_task(0), {"dataset": "blobs0", "kind": "mlp"}),
        (_lm_task(), {"dataset": "tiny", "kind": "lm"}),
    ]
    config = EvalConfig(num_tasks=2, num_seeds=2, num_steps=5, adam_lrs=(1e-2,), eval_every=5)
    res = suite.run_suite(
        pairs, {"sgd": lambda n: optax.sgd(0.1)}, config, jax.random.PRNGKey(0), str(tmp_path), 5
    )
    names = res["optimizers"]
    by_kind = res["summary_by_kind"]
    assert list(by_kind) == ["mlp", "lm"]  # in order of first appearance
    for kind in by_kind:
        assert all(by_kind[kind][n]["runs"] == 2 for n in names)  # 1 task × 2 seeds
    assert all(res["summary"][n]["runs"] == 4 for n in names)  # the overall summary stays
    # Bits per byte only where the task reports it, and never averaged with classification.
    assert "final_test_bits_per_byte" in by_kind["lm"]["sgd"]
    assert "final_test_bits_per_byte" not in by_kind["mlp"]["sgd"]
    assert "final_test_bits_per_byte" not in res["summary"]["sgd"]
    lm_seeds = res["tasks"][1]["optimizers"]["sgd"]["seeds"]
    for split in ("train", "valid", "test"):
        bpb = np.asarray(lm_seeds[f"final_{split}_bits_per_byte"])
        loss = np.asarray(lm_seeds[f"final_{split}_loss"])
        # float32 loss / ln 2, both stored as shortest float32 decimals: 1e-6 relative.
        np.testing.assert_allclose(bpb, loss / math.log(2), rtol=1e-6)
    assert "final_test_bits_per_byte" not in res["tasks"][0]["optimizers"]["sgd"]["seeds"]
    lm = by_kind["lm"]["sgd"]
    assert lm["final_test_bits_per_byte"]["mean"] == pytest.approx(
        lm["final_test_loss"]["mean"] / math.log(2), rel=1e-6
    )

    table = res["table"]
    assert "### kind: mlp (1 task)" in table and "### kind: lm (1 task)" in table
    mlp_part, lm_part = table.split("### kind: lm")
    assert "test acc" in mlp_part and "bits/byte" not in mlp_part
    assert "test bits/byte" in lm_part and "test acc" not in lm_part
    lm_rows = [ln for ln in lm_part.splitlines() if ln.startswith("| sgd |")]
    cells = [c.strip() for c in lm_rows[0].strip("|").split("|")]
    bpb = lm["final_test_bits_per_byte"]
    assert cells[5] == f"{bpb['mean']:.4f} ± {bpb['std']:.4f}"
    loaded = json.loads((tmp_path / "results.json").read_text())
    assert suite.format_table(loaded) == table
    assert table in (tmp_path / "results.md").read_text()

    # Tasks of one kind keep the single table, with that kind's columns.
    only_lm = {
        "optimizers": names,
        "labels": res["labels"],
        "summary": by_kind["lm"],
        "summary_by_kind": {"lm": by_kind["lm"]},
    }
    single = suite.format_table(only_lm)
    assert "### kind" not in single and "test bits/byte" in single

    from matplotlib.figure import Figure  # noqa: PLC0415 - slow import, this test only

    ax = Figure().subplots()
    suite._plot_task(ax, loaded["tasks"][1], 1, names, np.asarray(loaded["eval_steps"]), 1)
    assert ax.get_title() == "task 1: kind=lm, dataset=tiny"
