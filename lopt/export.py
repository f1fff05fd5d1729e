"""Export of a learned optimizer as an `optax.GradientTransformationExtraArgs`.

A thin adapter over `LearnedOptimizer.optimizer(theta)`: the same `init` and `update`
functions, never a second implementation. The loss arrives as the keyword `loss=`:

    tx = optax.chain(optax.clip_by_global_norm(1.0), as_optax(lopt, theta, num_steps=1000))
    updates, state = tx.update(grads, state, params, loss=loss)
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from lopt.base import LearnedOptimizer, MetaParams


def as_optax(
    lopt: LearnedOptimizer, theta: MetaParams, num_steps: int
) -> optax.GradientTransformationExtraArgs:
    """Returns the learned optimizer with meta-parameters `theta` as an optax transformation.

    Args:
      lopt: the learned optimizer.
      theta: its meta-parameters.
      num_steps: the training horizon the optimizer's progress features refer to; use the
        number of steps you will train for (learned optimizers generalise best near the
        horizons they were meta-trained on).

    Returns:
      A `GradientTransformationExtraArgs` whose `update(updates, state, params, *, loss)`
      requires `params` and the scalar training `loss` of the current step. Learned
      optimizers compute in float32 for any parameter dtype, give non-finite gradient
      entries a zero update without letting them into their state, anneal (1/t) instead of
      extrapolating when trained past `num_steps`, and pass non-float leaves through with
      zero updates (see `lopt.mlp_lopt`).
    """
    opt = lopt.optimizer(theta)

    def init_fn(params):
        return opt.init(params, num_steps)

    def update_fn(updates, state, params=None, *, loss: Any = None, **extra_args):
        del extra_args  # other transformations' extra arguments pass through optax.chain
        if params is None:
            raise ValueError("the learned optimizer needs `params` in update(...)")
        if loss is None:
            raise ValueError(
                "the learned optimizer needs the training loss: update(..., loss=loss)"
            )
        return opt.update(updates, state, params, loss)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def load_optax(checkpoint_dir: str, num_steps: int | None = None, step: int | str | None = None):
    """Loads an exported learned optimizer from a meta-training checkpoint directory alone.

    Args:
      checkpoint_dir: the run's checkpoint directory (holds orbax steps and the config).
      num_steps: training horizon; defaults to the maximum episode length of meta-training.
      step: which saved outer step: by default the one with the best meta-validation score
        (marked in the directory's `best.json`), else the latest; 'latest', 'best' or a
        number choose (see `meta_train.checkpoint.pick_step`).

    Returns:
      `(tx, theta, lopt)`: the optax transformation, its meta-parameters and the optimizer.
    """
    from meta_train.checkpoint import load_theta  # noqa: PLC0415 - orbax is heavy

    theta, config = load_theta(checkpoint_dir, step=step)
    from lopt.registry import make_lopt  # noqa: PLC0415

    lopt_cfg = dict(config["lopt"])
    lopt = make_lopt(lopt_cfg.pop("kind"), **lopt_cfg)
    if num_steps is None:
        num_steps = int(config["meta"]["max_episode_len"])
    theta = jax.tree.map(jax.numpy.asarray, theta)
    return as_optax(lopt, theta, num_steps), theta, lopt
