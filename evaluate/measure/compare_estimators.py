"""Compare outer-gradient estimators on a learned-optimizer task family at equal budget.

    python -m evaluate.measure.compare_estimators --config configs/default.toml \
        --estimators pes,es_single,tes --outer-steps 2000 --out runs/compare

Every estimator meta-trains the same learned optimizer from the same θ₀ on the same task
family with the same number of antithetic pairs and window, so each spends the same inner
steps per outer step (2 × pairs × K) and the same total budget. Then each trained optimizer
is evaluated on the same held-out tasks (with tuned Adam as a reference); see
`evaluate.measure.compare` for what is written.
"""

from __future__ import annotations

import argparse
import sys

from evaluate.measure.compare import compare

_EXAMPLES = """\
examples:
  %(prog)s --config configs/default.toml --estimators pes,es_single,tes \\
      --outer-steps 2000 --out runs/compare
  %(prog)s --estimators pes,tes --outer-steps 500 meta.num_pairs=4
"""


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Meta-trains one variant per estimator and compares them (`evaluate.measure.compare`).

    Args:
      argv: the command line's arguments (default: `sys.argv[1:]`).
      prog: the program's name in usage lines (default:
        `python -m evaluate.measure.compare_estimators`).

    Returns:
      `{"rows": per-estimator figures, "table": the markdown table}`.
    """
    p = argparse.ArgumentParser(
        prog=prog or "python -m evaluate.measure.compare_estimators",
        description=__doc__.split("\n")[0],
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="configs/default.toml")
    p.add_argument("--estimators", default="pes,es_single,tes")
    p.add_argument("--outer-steps", type=int, default=2000)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    args = p.parse_args(argv)
    names = [e.strip() for e in args.estimators.split(",") if e.strip()]
    variants = {name: [f"meta.estimator='{name}'"] for name in names}
    return compare(
        args.config, variants, args.outer_steps, args.out, args.overrides, label="estimator"
    )


if __name__ == "__main__":
    from meta_train.cli import run_tool

    sys.exit(run_tool(main))
