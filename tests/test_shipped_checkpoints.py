"""The learned optimizers shipped in checkpoints/ load from their directory alone and give
the figures the README reports for them."""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from evaluate.suite import train_seeds
from lopt.export import load_optax
from meta_train.build import build_run
from meta_train.checkpoint import load_theta
from meta_train.config import from_dict
from meta_train.main import evaluate_run

SHIPPED = sorted((Path(__file__).resolve().parents[1] / "checkpoints").glob("*/[0-9]*"))

# The shipped optimizer's table in its eval_results.md and the README (3 held-out tasks ×
# 3 seeds, 400 steps; `python -m evaluate --checkpoint checkpoints/mnist1d-mlp-pes`): mean
# and std over tasks × seeds. Adam's learning rate was tuned per task and chose 1e-2 on every
# task, so Adam at 1e-2 alone reproduces its row (and confirms the same tasks and seeds).
README_FIGURES = {
    "mnist1d-mlp-pes": {
        "learned": {
            "mean_train_loss": (1.2998, 0.1728),
            "final_train_loss": (1.0921, 0.1970),
            "final_valid_loss": (1.3382, 0.1073),
            "final_test_loss": (1.3373, 0.1298),
            "final_test_accuracy": (0.4830, 0.0591),
        },
        "adam": {
            "mean_train_loss": (1.3555, 0.1761),
            "final_train_loss": (1.0661, 0.2035),
            "final_valid_loss": (1.3188, 0.0928),
            "final_test_loss": (1.3175, 0.1148),
            "final_test_accuracy": (0.4906, 0.0513),
        },
        "adam_lr": 1e-2,
        "runs": 9,
        "num_steps": 400,
    },
    # `python -m meta_train.main --config configs/generalist.toml`'s evaluation (6 held-out
    # tasks of MLPs and ConvNets × 2 seeds, 1,000 steps; checkpoints/generalist/eval_results.md):
    # the learned row only (Adam chose 3e-3 or 1e-2 per task; its row needs the whole grid).
    "generalist": {
        "learned": {
            "mean_train_loss": (0.5686, 0.1670),
            "final_train_loss": (0.3801, 0.1773),
            "final_valid_loss": (0.7580, 0.5276),
            "final_test_loss": (0.7926, 0.5441),
        },
        "adam_lr": 1e-2,
        "runs": 12,
        "num_steps": 1000,
    },
}
# Every shipped optimizer's figures are checked in the slow stage (seconds to minutes each;
# the default stage stays under 10 minutes). Loading each one by name, its content hash and
# a short training run with each are checked in the default stage (tests/test_hub.py).
SHIPPED_PARAMS = [pytest.param(p, id=p.parent.name, marks=pytest.mark.slow) for p in SHIPPED]
# On the project's machine the evaluation reproduces the table to every printed digit, and
# perturbing θ by 1e-6 (relative) moved no figure by 1e-4: the runs do not amplify float32
# rounding, so another CPU's rounding moves the figures by far less than this margin, while
# it is below the standard error of a 9-run mean (0.017-0.07) and every figure must match.
MARGIN = 0.005


@pytest.mark.parametrize("step_dir", SHIPPED_PARAMS)
def test_shipped_optimizer_reproduces_the_readme_figures(step_dir, tmp_path):
    name = step_dir.parent.name
    assert name in README_FIGURES, f"add the README's figures of {name} to this test"
    figures = README_FIGURES[name]
    directory = str(step_dir.parent)
    _, theta, _ = load_optax(directory)
    _, saved = load_theta(directory)
    config = from_dict(saved)
    if name == "mnist1d-mlp-pes":  # saved before lopt.step_schedule existed: it loads
        # with the schedule it was trained with
        assert "step_schedule" not in saved["lopt"] and config.lopt.step_schedule == "constant"
    # The README's evaluation (the end of `python -m meta_train.main`: same held-out tasks,
    # seeds and horizon), with Adam's grid cut to the rate it chose.
    eval_cfg = dataclasses.replace(
        config.eval, adam_lrs=(figures["adam_lr"],), eval_every=config.meta.max_episode_len
    )
    run = build_run(dataclasses.replace(config, eval=eval_cfg))
    results = evaluate_run(run, theta, tmp_path)
    learned = f"learned ({config.meta.estimator})"
    runs = results["config"]["num_tasks"] * results["config"]["num_seeds"]
    assert runs == figures["runs"]
    assert results["config"]["num_steps"] == figures["num_steps"]
    for row, label in (("learned", learned), ("adam", "adam")):
        if row not in figures:
            continue
        summary = results["summary"][label]
        assert summary["diverged"] == 0 and summary["runs"] == runs
        for key, (mean, std) in figures[row].items():
            got = summary[key]
            assert abs(got["mean"] - mean) < MARGIN, (row, key, got["mean"], mean)
            assert abs(got["std"] - std) < MARGIN, (row, key, got["std"], std)


def test_something_is_shipped():
    assert SHIPPED, "checkpoints/ should hold at least one trained learned optimizer"


@pytest.mark.parametrize("step_dir", SHIPPED_PARAMS)
@pytest.mark.parametrize(
    "hidden",
    [None, pytest.param([128, 128], marks=pytest.mark.slow)],  # wider: ~12 s, slow stage
    ids=["family", "wider"],
)
def test_shipped_optimizer_trained_past_its_horizon_does_not_diverge(step_dir, hidden):
    # A user who declares num_steps=400 and trains 1,500 steps: before the progress
    # features saturated and the update annealed past the horizon, the loss rose to
    # 57-1e7 on every classifier tried (here: 0.95 -> 6.4 on the wider model).
    horizon, steps = 400, 1500
    tx, _, _ = load_optax(str(step_dir.parent), num_steps=horizon)
    _, saved = load_theta(str(step_dir.parent))
    config = from_dict(saved)
    if hidden is not None:  # a model wider than any in the family it was trained on
        family_cfg = dataclasses.replace(config.task_family, hidden_sizes=(tuple(hidden),))
        config = dataclasses.replace(config, task_family=family_cfg)
    run = build_run(config)
    for i in range(2):
        task = run.family.sample(jax.random.fold_in(run.held_out_key(), i))
        out = train_seeds(task, tx, steps, jax.random.split(jax.random.PRNGKey(i), 2), steps)
        curve = np.asarray(out["train_curve"])  # [seeds, steps] minibatch losses
        assert not np.any(np.asarray(out["diverged"])) and np.all(np.isfinite(curve))
        at_horizon = curve[:, horizon - 100 : horizon].mean()
        at_end = curve[:, -100:].mean()
        # Past the horizon training keeps converging: the loss does not rise (allowing
        # minibatch noise of ±0.05 on a mean of 200 losses; measured: it falls on both).
        assert at_end < at_horizon + 0.05, (at_horizon, at_end)
        assert at_end < np.log(10.0)  # below the trivial 10-class predictor
