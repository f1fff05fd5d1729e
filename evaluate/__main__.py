"""Evaluates a meta-trained learned optimizer against tuned Adam on held-out tasks.

    python -m evaluate --checkpoint RUN_DIR/checkpoints [--num-steps N] [--out DIR] [--step S]

Uses the run's saved config (task family, eval section, seed): the same held-out tasks as
the evaluation at the end of meta-training. Writes results.json, results.md and curves.png
and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    p = argparse.ArgumentParser(prog="python -m evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="the run's checkpoint directory")
    p.add_argument(
        "--num-steps",
        type=int,
        default=None,
        help="training steps (default: eval.num_steps, else meta.max_episode_len)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output directory (default: RUN_DIR/eval, or RUN_DIR/eval_<N>steps with --num-steps)",
    )
    p.add_argument("--step", type=int, default=None, help="outer step to load (default: latest)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Loads the checkpoint, runs the suite and prints the table; returns the exit status."""
    args = parse_args(argv)
    # Heavy imports after argument parsing, so --help is instant.
    import jax  # noqa: PLC0415

    from evaluate.suite import run_suite  # noqa: PLC0415
    from lopt.export import as_optax, load_optax  # noqa: PLC0415
    from meta_train.build import HELD_OUT_STREAM  # noqa: PLC0415
    from meta_train.checkpoint import load_theta  # noqa: PLC0415
    from meta_train.config import from_dict  # noqa: PLC0415
    from tasks.family import MLPTaskFamily  # noqa: PLC0415

    ckpt = Path(args.checkpoint)
    _, saved = load_theta(str(ckpt), step=args.step)
    config = from_dict(saved)
    horizon = config.eval.num_steps or config.meta.max_episode_len
    num_steps = args.num_steps or horizon
    # load_optax builds the optimizer exactly as users get it from the checkpoint.
    tx, theta, lopt = load_optax(str(ckpt), num_steps, step=args.step)

    def factory(n: int):
        return tx if n == num_steps else as_optax(lopt, theta, n)

    run_dir = ckpt.resolve().parent
    out = (
        Path(args.out)
        if args.out
        else run_dir / (f"eval_{num_steps}steps" if args.num_steps else "eval")
    )
    family = MLPTaskFamily(config.task_family)
    key = jax.random.fold_in(jax.random.PRNGKey(config.run.seed), HELD_OUT_STREAM)
    eval_cfg = dataclasses.replace(config.eval, num_steps=num_steps)
    results = run_suite(family, {"learned": factory}, eval_cfg, key, str(out), num_steps)
    print(results["table"])
    print(f"results: {out}/results.json, {out}/results.md, {out}/curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
