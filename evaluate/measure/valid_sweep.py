"""Score a trained θ on its run's meta-validation tasks with one optimizer option swept.

    python -m evaluate.measure.valid_sweep checkpoints/generalist \
        --option weight_decay --values 0 1e-3 3e-3 1e-2 [--seeds 3] [--out FILE.json]

An option that is not a meta-parameter (the per-parameter MLP's `weight_decay`, say) can be
chosen after meta-training, but choosing it on a benchmark would tune on the test. This
chooses it where the recipe chose its checkpoint: the run's own meta-validation tasks
(`meta_train.validation`: held-out tasks of the family, split from the evaluation's by
their key), scored as meta-validation scores (final validation loss ÷ Adam's at
`valid.adam_lr`, mean over tasks; lower is better). The benchmark suites stay a test.

`--option weight_decay_per_epoch` sweeps a decay that follows each task's data: task i
trains with `weight_decay = value / steps_per_epoch_i` (`tasks.epochs`), the rule
`lopt.pretrained(..., steps_per_epoch=)` applies with the index's `weight_decay_per_epoch`.
`--per-epoch-decay C` holds that decay at C while another option is swept;
`--option weight_decay_floor` sweeps a least decay per step under it (each task trains with
`max(C / steps_per_epoch_i, value)`). `--option weight_decay_epoch_exponent` sweeps how fast
that decay falls with the data's size (`lopt.hub.per_step_decay`: `C / F * (F /
steps_per_epoch_i) ** value`, F from `--min-steps-per-epoch`, the index's
`min_steps_per_epoch`). `--orthogonalised` scores the rule as `lopt.hub.orthogonalised`
wraps it. `--set OPTION=VALUE` holds any other option (the
shipped index's `options`, say) while one is swept.
`--horizon-scale K` trains the same tasks and seeds K times longer than the run validated
them: a setting such as the decay can look neutral at meta-training's episode lengths and
matter at the longer horizons users train for.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from meta_train.cli import UserError, run_cli

_EXAMPLES = """\
example:
  %(prog)s checkpoints/generalist --option weight_decay --values 0 1e-3 3e-3 1e-2
"""


PER_EPOCH = "weight_decay_per_epoch"
"""The option name of a weight decay per pass over each task's data."""
FLOOR = "weight_decay_floor"
"""The option name of a least decay per step under the decay per epoch."""
EXPONENT = "weight_decay_epoch_exponent"
"""The option name of how fast the decay per epoch falls with the steps per epoch."""


def sweep(
    checkpoint: str,
    option: str,
    values: list[float],
    seeds: int,
    per_epoch_decay: float | None = None,
    horizon_scale: int = 1,
    held: dict[str, float] | None = None,
    num_tasks: int | None = None,
    fewest: float = 1.0,
    orthogonalised: bool = False,
) -> list[dict]:
    """Meta-validation scores of the checkpoint's θ with `option` set to each value.

    Args:
      checkpoint: a meta-training checkpoint directory (or a shipped optimizer's folder).
      option: a field of the checkpoint's learned optimizer, or `PER_EPOCH`.
      values: the values to score.
      seeds: seeds per validation task.
      per_epoch_decay: with another option swept, every task also trains with
        `weight_decay = per_epoch_decay / steps_per_epoch` (None: the checkpoint's decay).
      horizon_scale: every validation task's horizon multiplied by this.
      held: other options set to these values throughout (the shipped index's `options`,
        say), so a setting is chosen with the ones already chosen in place.
      num_tasks: validation tasks to score on (None: the run's `valid.num_tasks`). More
        tasks of the same held-out stream make a choice less hostage to which few were drawn.
      fewest: the steps per epoch below which a decay per epoch stays at its value there,
        and the anchor of `EXPONENT` (the index's `min_steps_per_epoch`).
      orthogonalised: score the rule with its 2-D steps orthogonalised at their own size
        (`lopt.hub.orthogonalised_rule`, what `lopt.hub.orthogonalised` ships).

    Returns:
      One row per value: the value, `score` and the per-task ratios.
    """
    if not (isinstance(horizon_scale, int) and horizon_scale >= 1):
        raise UserError(f"--horizon-scale must be an integer >= 1, got {horizon_scale}")
    if num_tasks is not None and not (isinstance(num_tasks, int) and num_tasks >= 1):
        raise UserError(f"--num-tasks must be an integer >= 1, got {num_tasks}")
    from lopt.checkpoint import load_theta  # noqa: PLC0415 - orbax is heavy
    from meta_train.build import build_run  # noqa: PLC0415
    from meta_train.config import from_dict  # noqa: PLC0415
    from meta_train.validation import build_validator, per_epoch_decay_lopts  # noqa: PLC0415
    from tasks.epochs import steps_per_epoch  # noqa: PLC0415

    theta, saved = load_theta(checkpoint)
    config = from_dict(saved)
    valid = dataclasses.replace(config.valid, num_seeds=seeds)
    if num_tasks is not None:
        valid = dataclasses.replace(valid, num_tasks=num_tasks)
    config = dataclasses.replace(config, valid=valid)
    run = build_run(config)
    per_epoch = option == PER_EPOCH
    floor = option == FLOOR
    exponent = option == EXPONENT
    if per_epoch and per_epoch_decay is not None:
        raise UserError(f"--per-epoch-decay with --option {PER_EPOCH}: sweep one of them")
    if (floor or exponent) and per_epoch_decay is None:
        raise UserError(f"--option {option} needs --per-epoch-decay C: the decay it shapes")
    if not fewest > 0:
        raise UserError(f"--min-steps-per-epoch must be > 0, got {fewest}")
    field = "weight_decay" if per_epoch or floor or exponent else option
    held = dict(held or {})
    if "weight_decay" in held and (per_epoch or per_epoch_decay is not None):
        raise UserError("--set weight_decay with a decay per epoch: each task's decay is set")
    names = {field} | set(held) | ({"weight_decay"} if per_epoch_decay is not None else set())
    for name in sorted(names):
        if not any(f.name == name for f in dataclasses.fields(run.lopt)):
            raise UserError(f"{type(run.lopt).__name__} has no option {name!r}")
    if held:
        run.lopt = dataclasses.replace(run.lopt, **held)
    per_task = per_epoch or per_epoch_decay is not None
    validator = build_validator(run, horizon_scale)
    if orthogonalised:
        from lopt.hub import orthogonalised_rule  # noqa: PLC0415

        validator.transform = orthogonalised_rule
    task_steps = [steps_per_epoch(t.task) for t in validator.tasks] if per_task else []
    horizons = [t.horizon for t in validator.tasks]
    rows = []
    for value in values:
        if per_task:  # each task its own decay: the swept one, or the one held
            decay = value if per_epoch else per_epoch_decay
            swept = {} if per_epoch or floor or exponent else {option: value}
            validator.task_lopts = per_epoch_decay_lopts(
                dataclasses.replace(run.lopt, **swept),
                validator.tasks,
                decay,
                floor=value if floor else 0.0,
                fewest=fewest,
                exponent=value if exponent else 1.0,
            )
        else:  # one rule for all (a run's valid.weight_decay_per_epoch is not applied)
            validator.task_lopts = None
            validator.lopt = dataclasses.replace(run.lopt, **{option: value})
        scores = validator(theta)
        if per_task:
            scores["steps_per_epoch"] = task_steps
        rows.append({option: value, **scores, "horizons": horizons})
        print(f"{option}={value:g}: score {scores['score']:.4f}", flush=True)
    return rows


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Runs the sweep from the command line (`--help`); returns the exit status."""
    p = argparse.ArgumentParser(
        prog=prog or "python -m evaluate.measure.valid_sweep",
        description=__doc__.split("\n\n")[2].replace("\n", " "),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="a checkpoint directory or a shipped optimizer's folder")
    p.add_argument("--option", required=True, help="a learned-optimizer option to sweep")
    p.add_argument("--values", required=True, nargs="+", type=float, help="its values")
    p.add_argument("--seeds", type=int, default=3, help="seeds per validation task (3)")
    p.add_argument(
        "--num-tasks",
        type=int,
        default=None,
        metavar="N",
        help="score on N validation tasks of the run's held-out stream (default: the run's)",
    )
    p.add_argument(
        "--per-epoch-decay",
        type=float,
        default=None,
        metavar="C",
        help=f"train every task with weight decay C / its steps per epoch while --option is "
        f"swept (as lopt.pretrained does with the index's {PER_EPOCH})",
    )
    p.add_argument(
        "--min-steps-per-epoch",
        type=float,
        default=1.0,
        metavar="F",
        help="a decay per epoch stays at its value at F steps per epoch below F, and "
        f"--option {EXPONENT} anchors there (the index's min_steps_per_epoch; 1)",
    )
    p.add_argument(
        "--horizon-scale",
        type=int,
        default=1,
        metavar="K",
        help="train every validation task K times longer than the run did (1)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="hold another option at a value throughout (repeatable), e.g. the shipped "
        "index's options: --set width_scale_max=3",
    )
    p.add_argument(
        "--orthogonalised",
        action="store_true",
        help="score the rule with its 2-D steps orthogonalised at their own size "
        "(lopt.hub.orthogonalised)",
    )
    p.add_argument("--out", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    # Its own run_cli, under `lopt measure` too (whose dispatcher runs tools without the
    # compile cache): a sweep compiles the same validation programs as the run did.
    return run_cli(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    if not Path(args.checkpoint).is_dir():
        raise UserError(f"no checkpoint directory {args.checkpoint}")
    rows = sweep(
        args.checkpoint,
        args.option,
        args.values,
        args.seeds,
        args.per_epoch_decay,
        args.horizon_scale,
        _held(args.set),
        args.num_tasks,
        args.min_steps_per_epoch,
        args.orthogonalised,
    )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


def _held(pairs: list[str]) -> dict[str, float]:
    """`--set OPTION=VALUE` pairs as a dict; a malformed pair is a user error."""
    held = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is None or not name.strip():
            raise UserError(f"--set wants OPTION=NUMBER, got {pair!r}")
        held[name.strip()] = number
    return held


if __name__ == "__main__":
    sys.exit(main())
