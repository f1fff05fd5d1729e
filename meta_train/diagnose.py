"""Estimator diagnostics at fixed meta-parameters: how noisy each window's estimate is, by
how far into its episode the window lies.

    python -m meta_train.diagnose --checkpoint RUN/checkpoints [--step N] [--windows 300]
        [--estimators pes,es_single] [--out DIR] [section.key=value ...]

Loads θ and the config of a checkpoint (overrides change the config, e.g. `meta.num_pairs`),
then for each estimator runs `--windows` windows of fresh staggered particles with θ held
fixed (nothing is learned), and records per pair and window the squared norm of the
single-pair estimate and the window's index in its episode. With θ fixed the mean estimate is the
gradient g, and E|ĝ_i|² = |g|² + trace-variance, so the squared norm by window index shows
PES's accumulated noise directly. Writes `diagnose.json` and `variance_by_window.png`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from meta_train.cli import run_cli

BINS = (0, 1, 3, 10, 30, 100, 1_000_000)


_EXAMPLES = """\
examples:
  %(prog)s --checkpoint runs/default/checkpoints
  %(prog)s --checkpoint runs/default/checkpoints --step latest --windows 100 \\
      --estimators pes meta.num_pairs=16
"""


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
      argv: the arguments (default: `sys.argv[1:]`).
      prog: the program's name in usage lines (default: `python -m meta_train.diagnose`).

    Returns:
      The parsed arguments.
    """
    p = argparse.ArgumentParser(
        prog=prog or "python -m meta_train.diagnose",
        description=__doc__,
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a run's checkpoint directory")
    p.add_argument("--step", default=None, help="best (default), latest or a step number")
    p.add_argument("--windows", type=int, default=300, help="windows per estimator")
    p.add_argument("--estimators", default="pes,es_single", help="comma-separated names")
    p.add_argument("--out", default=None, help="output folder (default: RUN/diagnose)")
    p.add_argument("--debug", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides: section.key=value")
    return p.parse_intermixed_args(argv)


def _window_records(estimator, theta, key: jax.Array, windows: int) -> dict[str, np.ndarray]:
    """Per window and pair: the squared single-pair estimate norm and the window's index."""
    k = estimator.schedule.window

    @jax.jit
    def one(state, key):
        index = jnp.concatenate([p.step[:, 0] // k for p in state.particles])
        per_pair, state, _ = estimator.estimate_per_pair(state, theta, key)
        return state, (jnp.sum(per_pair**2, axis=1), index)

    state = estimator.init(jax.random.fold_in(key, 0), theta)
    sq, idx = [], []
    for w in range(windows):
        state, (s, i) = one(state, jax.random.fold_in(key, w + 1))
        sq.append(s)
        idx.append(i)
    sq, idx = jax.device_get((jnp.stack(sq), jnp.stack(idx)))
    return {"sq_norm": np.asarray(sq).ravel(), "index": np.asarray(idx).ravel()}


def summarise(records: dict[str, np.ndarray]) -> list[dict]:
    """Mean squared single-pair estimate norm per bin of window index (`BINS`)."""
    out = []
    for lo, hi in zip(BINS[:-1], BINS[1:], strict=True):
        m = (records["index"] >= lo) & (records["index"] < hi)
        if m.any():
            out.append(
                {
                    "windows": f"{lo}-{hi - 1}" if hi < BINS[-1] else f"{lo}+",
                    "count": int(m.sum()),
                    "mean_sq_norm": float(np.mean(records["sq_norm"][m])),
                }
            )
    return out


def _plot(results: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        idx, sq = np.asarray(r["records"]["index"]), np.asarray(r["records"]["sq_norm"])
        xs = np.unique(idx)
        ys = [np.mean(sq[idx == x]) for x in xs]
        ax.plot(xs + 1, ys, ".", label=name, alpha=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("window index in its episode (1 = first window)")
    ax.set_ylabel("mean |single-pair estimate|^2")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _diagnose(args: argparse.Namespace) -> int:
    from meta_train.build import build_run  # noqa: PLC0415
    from meta_train.checkpoint import load_theta, pick_step  # noqa: PLC0415
    from meta_train.config import apply_overrides, from_dict  # noqa: PLC0415

    step = args.step if args.step in (None, "best", "latest") else int(args.step)
    step = pick_step(args.checkpoint, step)
    theta, saved = load_theta(args.checkpoint, step)
    results = {}
    for name in args.estimators.split(","):
        config = from_dict(
            apply_overrides(
                json.loads(json.dumps(saved)),
                [*args.overrides, f"meta.estimator={name!r}", "valid.every=0"],
            )
        )
        run = build_run(config)
        theta = jax.tree.map(jnp.asarray, theta)
        records = _window_records(run.estimator, theta, jax.random.PRNGKey(0), args.windows)
        results[name] = {"bins": summarise(records), "records": records}
        for b in results[name]["bins"]:
            print(
                f"{name:10s} windows {b['windows']:>7s}: mean |g_i|^2 {b['mean_sq_norm']:.3g}"
                f" ({b['count']} pair-windows)"
            )
    out = Path(args.out or Path(args.checkpoint).resolve().parent / "diagnose")
    out.mkdir(parents=True, exist_ok=True)
    _plot(results, out / "variance_by_window.png")
    (out / "diagnose.json").write_text(
        json.dumps(
            {
                "step": step,
                "windows": args.windows,
                "estimators": {k: v["bins"] for k, v in results.items()},
            },
            indent=1,
        )
    )
    print(f"wrote {out}/diagnose.json and variance_by_window.png (theta of step {step})")
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Runs the diagnostics of a checkpoint.

    Args:
      argv: the command line's arguments (default: `sys.argv[1:]`).
      prog: the program's name in usage lines (default: `python -m meta_train.diagnose`).

    Returns:
      The exit status: 0, or 2 after a user error.
    """
    args = parse_args(argv, prog)
    return run_cli(lambda: _diagnose(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
