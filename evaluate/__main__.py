"""Evaluates a meta-trained learned optimizer against tuned Adam on held-out tasks.

    python -m evaluate --checkpoint RUN_DIR/checkpoints [--num-steps N] [--out DIR]
                       [--step best|latest|N] [eval.key=value ...]

Uses the run's saved config (task family, eval section, seed): the same held-out tasks as
the evaluation at the end of meta-training. By default it loads the step with the best
meta-validation score (`best.json` in the checkpoint directory), else the latest; a step
other than that default writes to RUN_DIR/eval_step<N>. `eval.key=value` overrides change the [eval]
section only (the rest is the checkpoint's). Writes results.json, results.md and curves.png
and prints the table. User errors (a wrong checkpoint, a bad override, a missing dataset)
end with one message and exit code 2; `--debug` shows their traceback.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

_EXAMPLES = """\
examples:
  %(prog)s --checkpoint checkpoints/mnist1d-mlp-pes
  %(prog)s --checkpoint runs/default/checkpoints --step latest --num-steps 2000
  %(prog)s --checkpoint runs/default/checkpoints eval.num_seeds=5
"""


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
      argv: the arguments (default: `sys.argv[1:]`).
      prog: the program's name in usage lines (default: `python -m evaluate`).

    Returns:
      The parsed arguments.
    """
    p = argparse.ArgumentParser(
        prog=prog or "python -m evaluate",
        description=__doc__.split("\n")[0],
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
        help="output directory (default: RUN_DIR/eval for the saved [eval] settings, "
        "RUN_DIR/eval_<N>steps with another horizon, RUN_DIR/eval_<hash> with other overrides)",
    )
    p.add_argument(
        "--step",
        type=_step,
        default=None,
        help="outer step to load: best, latest or a number (default: the best-marked step, "
        "else the latest)",
    )
    p.add_argument(
        "--debug", action="store_true", help="show the traceback of user errors, not only a message"
    )
    p.add_argument("overrides", nargs="*", help="[eval] overrides: eval.key=value")
    return p.parse_intermixed_args(argv)  # flags may come between the overrides


def _step(text: str) -> int | str:
    if text in ("best", "latest"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected best, latest or a step number, got {text!r}"
        ) from None


def _check_overrides(overrides: list[str]) -> None:
    """Fails on overrides outside [eval] or with bad values, before anything is loaded."""
    from meta_train.config import (  # noqa: PLC0415
        ConfigError,
        apply_overrides,
        from_dict,
        parse_override,
    )

    for item in overrides:
        section, _, _ = parse_override(item)
        if section != "eval":
            raise ConfigError(
                f"override {item!r}: python -m evaluate takes only eval.key=value overrides; "
                "the other sections are fixed by the checkpoint"
            )
    from_dict(apply_overrides({}, overrides))


def _out_dir(
    args: argparse.Namespace, run_dir: Path, eval_cfg, saved_eval, other_step: int | None
) -> Path:
    """RUN_DIR/eval reproduces the saved settings at the default step; other settings or
    another step never overwrite it."""
    if args.out:
        return Path(args.out)
    changed = {
        f.name
        for f in dataclasses.fields(eval_cfg)
        if saved_eval is None or getattr(eval_cfg, f.name) != getattr(saved_eval, f.name)
    }
    if args.num_steps is not None:
        changed.add("num_steps")
    if not changed:
        name = "eval"
    elif changed == {"num_steps"}:
        name = f"eval_{eval_cfg.num_steps}steps"
    else:
        digest = json.dumps(dataclasses.asdict(eval_cfg), sort_keys=True).encode()
        name = f"eval_{hashlib.sha256(digest).hexdigest()[:8]}"
    if other_step is not None:
        name += f"_step{other_step}"
    return run_dir / name


def _evaluate(args: argparse.Namespace) -> int:
    from meta_train.config import ConfigError, apply_overrides, from_dict  # noqa: PLC0415

    if args.num_steps is not None and args.num_steps < 1:
        raise ConfigError(f"--num-steps must be an integer >= 1; got {args.num_steps}")
    _check_overrides(args.overrides)
    # The checkpoint and the datasets only after the arguments are known to be good.
    import jax  # noqa: PLC0415

    from evaluate.suite import run_suite  # noqa: PLC0415
    from lopt.export import as_optax, load_optax  # noqa: PLC0415
    from meta_train.build import HELD_OUT_STREAM  # noqa: PLC0415
    from meta_train.checkpoint import load_theta, pick_step, read_best  # noqa: PLC0415
    from tasks.family import TaskFamily  # noqa: PLC0415

    ckpt = Path(args.checkpoint)
    default_step = pick_step(str(ckpt))  # the best-marked step, else the latest
    step = default_step if args.step is None else pick_step(str(ckpt), args.step)
    _, saved = load_theta(str(ckpt), step=step)
    best = read_best(str(ckpt))
    which = "best meta-validation score" if best and best["step"] == step else "no best marked"
    if best and best["step"] != step:
        which = f"the best-marked step is {best['step']}"
    print(f"evaluating outer step {step} ({which})", file=sys.stderr)
    config = from_dict(apply_overrides(copy.deepcopy(saved), args.overrides))
    try:
        saved_config = from_dict(saved)
        saved_eval = dataclasses.replace(
            saved_config.eval,
            num_steps=saved_config.eval.num_steps or saved_config.meta.max_episode_len,
        )
    except ConfigError:  # an older run's [eval] that is no longer valid (and overridden)
        saved_eval = None
    horizon = config.eval.num_steps or config.meta.max_episode_len
    num_steps = args.num_steps or horizon
    # load_optax builds the optimizer exactly as users get it from the checkpoint.
    tx, theta, lopt = load_optax(str(ckpt), num_steps, step=step)

    def factory(n: int):
        return tx if n == num_steps else as_optax(lopt, theta, n)

    eval_cfg = dataclasses.replace(config.eval, num_steps=num_steps)
    other = step if step != default_step else None
    out = _out_dir(args, ckpt.resolve().parent, eval_cfg, saved_eval, other)
    family = TaskFamily(config.task_family)
    key = jax.random.fold_in(jax.random.PRNGKey(config.run.seed), HELD_OUT_STREAM)
    results = run_suite(family, {"learned": factory}, eval_cfg, key, str(out), num_steps)
    print(results["table"])
    print(f"results: {out}/results.json, {out}/results.md, {out}/curves.png")
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Loads the checkpoint, runs the suite and prints the table.

    Args:
      argv: the command line's arguments (default: `sys.argv[1:]`).
      prog: the program's name in usage and error lines (default: `python -m evaluate`).

    Returns:
      The exit status: 0, or 2 after a user error.
    """
    args = parse_args(argv, prog)
    from meta_train.cli import run_cli  # noqa: PLC0415

    return run_cli(lambda: _evaluate(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
