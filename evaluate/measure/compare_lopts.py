"""Compare learned-optimizer architectures at equal meta-training budget.

    python -m evaluate.measure.compare_lopts --config configs/default.toml --outer-steps 3000 \
        --out runs/compare_lopts [--variant NAME=OVERRIDE[;OVERRIDE...] ...] [overrides]

Every variant meta-trains on the same task family with the same estimator, pairs, window
and number of outer steps (so the same inner steps), then is evaluated at its best
meta-validation step on the same held-out tasks against tuned Adam; see `evaluate.measure.compare`
for what is written. Without `--variant`, the zoo: every kind of `lopt.registry.LOPTS` with
its default options, and the per-parameter MLP with each generalisation mechanism
(`default_variants`).
"""

from __future__ import annotations

import argparse
import sys

from evaluate.measure.compare import compare, parse_variants

# The per-parameter MLP of the default config, with each generalisation mechanism on its own;
# then every other kind at its defaults with the default config's cosine step schedule (a
# kind override starts [lopt] afresh, see `meta_train.config.apply_overrides`).
MLP_VARIANTS = (
    "mlp=lopt.kind='mlp'",
    "mlp-no-feature-norm=lopt.feature_norm=false",
    "mlp-fan-in=lopt.width_scaling='fan_in'",
    "mlp-schedule-head=lopt.schedule_head=16",
)


def default_variants() -> list[str]:
    """`MLP_VARIANTS`, then every other registered kind (cosine step schedule)."""
    from lopt.registry import LOPTS  # noqa: PLC0415

    others = [
        f"{kind}=lopt.kind='{kind}';lopt.step_schedule='cosine'" for kind in LOPTS if kind != "mlp"
    ]
    return [*MLP_VARIANTS, *others]


_EXAMPLES = """\
examples:
  %(prog)s --config configs/default.toml --outer-steps 3000 --out runs/compare_lopts
  %(prog)s --outer-steps 500 --variant "mlp=lopt.kind='mlp'" \\
      --variant "adafac=lopt.kind='adafac';lopt.step_schedule='cosine'"
"""


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Meta-trains every variant and compares them (`evaluate.measure.compare`).

    Args:
      argv: the command line's arguments (default: `sys.argv[1:]`).
      prog: the program's name in usage lines (default: `python -m evaluate.measure.compare_lopts`).

    Returns:
      `{"rows": per-variant figures, "table": the markdown table}`.
    """
    p = argparse.ArgumentParser(
        prog=prog or "python -m evaluate.measure.compare_lopts",
        description=__doc__.split("\n")[0],
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="configs/default.toml")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES")
    p.add_argument("--outer-steps", type=int, default=3000)
    p.add_argument("--out", default="runs/compare_lopts")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    args = p.parse_args(argv)
    try:
        variants = parse_variants(args.variant or default_variants())
    except ValueError as e:
        p.error(str(e))
    return compare(
        args.config, variants, args.outer_steps, args.out, args.overrides, label="optimizer"
    )


if __name__ == "__main__":
    from meta_train.cli import run_tool

    sys.exit(run_tool(main))
