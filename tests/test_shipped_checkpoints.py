"""The learned optimizers shipped in checkpoints/ load from their directory and work."""

from pathlib import Path

import jax
import numpy as np
import pytest

from evaluate.suite import train_seeds
from lopt.export import as_optax, load_optax
from meta_train.build import HELD_OUT_STREAM, build_lopt
from meta_train.checkpoint import load_theta
from meta_train.config import from_dict
from tasks.family import MLPTaskFamily

SHIPPED = sorted((Path(__file__).resolve().parents[1] / "checkpoints").glob("*/[0-9]*"))


@pytest.mark.parametrize("step_dir", SHIPPED, ids=lambda p: p.parent.name)
def test_shipped_optimizer_beats_its_untrained_start_on_held_out_tasks(step_dir):
    directory = str(step_dir.parent)
    tx, theta, lopt = load_optax(directory)
    _, saved = load_theta(directory)
    config = from_dict(saved)
    family = MLPTaskFamily(config.task_family)
    steps = config.meta.max_episode_len
    untrained = as_optax(build_lopt(config), lopt.init_meta(jax.random.PRNGKey(0)), steps)
    key = jax.random.fold_in(jax.random.PRNGKey(config.run.seed + 1), HELD_OUT_STREAM)
    for i in range(2):
        task = family.sample(jax.random.fold_in(key, i))
        seeds = jax.random.split(jax.random.PRNGKey(i), 2)
        shipped = train_seeds(task, tx, steps, seeds, steps)
        start = train_seeds(task, untrained, steps, seeds, steps)
        assert not np.any(shipped["diverged"])
        assert np.mean(shipped["mean_train_loss"]) < np.mean(start["mean_train_loss"]) - 0.1


def test_something_is_shipped():
    assert SHIPPED, "checkpoints/ should hold at least one trained learned optimizer"
