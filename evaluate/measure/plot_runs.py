"""Compares meta-training runs from their `metrics.jsonl`: meta-loss, estimator variance and
meta-validation score against outer steps.

    python -m evaluate.measure.plot_runs runs/a=PES runs/b="ES-Single" --out docs/runs.png \\
        [--block 250]

Meta-loss is the mean and estimator variance the median over blocks of `--block` outer
steps (both are noisy step to step). The validation score is read from the `valid/score`
records of `metrics.jsonl`, or from `valid_scores.json` (written by
`scripts/validate_checkpoints.py` for runs trained before meta-validation existed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def read_run(run_dir: str | Path, block: int) -> dict[str, np.ndarray]:
    """Block statistics and validation scores of one run.

    Returns:
      `step` (block ends), `meta_loss` (block means), `variance` (block medians),
      `valid_step` and `valid_score`.
    """
    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "meta_loss" in r]
    if not train:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no meta-training records")
    steps = np.array([r["step"] for r in train])
    loss = np.array([r["meta_loss"] for r in train], float)
    var = np.array([r["estimate_variance"] for r in train], float)
    ends = np.arange(block, steps.max() + block, block)
    blocks = [(steps > e - block) & (steps <= e) for e in ends]
    keep = [b.any() for b in blocks]
    valid = [(r["step"], r["valid/score"]) for r in rows if "valid/score" in r]
    if not valid and (run_dir / "valid_scores.json").exists():
        scores = json.loads((run_dir / "valid_scores.json").read_text())["scores"]
        valid = [(r["step"], r["score"]) for r in scores]
    valid = sorted(dict(valid).items())  # a resumed run may have redone a step
    return {
        "step": ends[keep],
        "meta_loss": np.array([loss[b].mean() for b, k in zip(blocks, keep, strict=True) if k]),
        "variance": np.array([np.median(var[b]) for b, k in zip(blocks, keep, strict=True) if k]),
        "valid_step": np.array([s for s, _ in valid]),
        "valid_score": np.array([v for _, v in valid], float),
    }


def plot(runs: dict[str, dict], path: str | Path, block: int) -> None:
    """Three panels: meta-loss, estimator variance (log) and validation score."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, r in runs.items():
        axes[0].plot(r["step"], r["meta_loss"], label=label)
        axes[1].plot(r["step"], r["variance"], label=label)
        if len(r["valid_step"]):
            axes[2].plot(r["valid_step"], r["valid_score"], ".-", label=label)
    axes[0].set_title(f"meta-loss (mean over {block}-step blocks)")
    axes[1].set_title(f"estimate variance (median over {block}-step blocks)")
    axes[1].set_yscale("log")
    axes[2].set_title("meta-validation score (final valid loss / Adam's)")
    axes[2].axhline(1.0, color="grey", lw=0.8, ls="--")
    for ax in axes:
        ax.set_xlabel("outer step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_EXAMPLES = """\
examples:
  %(prog)s runs/a=PES runs/b=ES-Single --out runs.png
  %(prog)s runs/default --out default.png --block 100
"""


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Reads the runs, writes the figure and prints its path.

    Args:
      argv: the command line's arguments (default: `sys.argv[1:]`).
      prog: the program's name in usage lines (default: `python -m evaluate.measure.plot_runs`).

    Returns:
      The exit status (0).
    """
    p = argparse.ArgumentParser(
        prog=prog or "python -m evaluate.measure.plot_runs",
        description=__doc__,
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", help="RUN_DIR or RUN_DIR=LABEL")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--block", type=int, default=250, help="outer steps per block")
    args = p.parse_args(argv)
    runs = {}
    for item in args.runs:
        path, _, label = item.partition("=")
        runs[label or Path(path).name] = read_run(path, args.block)
    plot(runs, args.out, args.block)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from meta_train.cli import run_tool

    sys.exit(run_tool(main))
