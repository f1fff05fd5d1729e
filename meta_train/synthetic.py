"""Run outer-gradient estimators on the synthetic problems with known answers.

    python -m meta_train.synthetic --problem influence            # the PES paper's settings
    python -m meta_train.synthetic --problem toy2d --estimators pes,es_single,tes
    python -m meta_train.synthetic --problem influence --estimators tbptt --window 100

Each estimator runs through the same estimator and learner code as learned-optimizer
meta-training (`meta_train.estimators`, `meta_train.learner`). Prints a summary and writes
`<out>/results.json` (final θ, final meta-objective and the θ trajectory per estimator) and
`<out>/curves.png` (θ and the meta-objective against iterations, one curve per estimator).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from meta_train.estimators import ESTIMATORS, WindowObjective, make_estimator
from meta_train.jit import jit
from meta_train.learner import init_learner, outer_step
from meta_train.unroll import EpisodeSchedule
from tasks.synthetic import InfluenceBalancing, LinearQuadratic, Toy2DRegression

# An episode that never ends within a run ("online, never reset").
NEVER = 2**30


@dataclasses.dataclass(frozen=True)
class Setting:
    """One synthetic experiment (defaults: the published settings)."""

    window: int
    episode: int
    particles: int
    sigma: float
    outer_opt: str
    lr: float
    iterations: int
    theta0: tuple[float, ...]
    objective: str
    stagger: str


DEFAULTS = {
    # PES paper §5.1: K=1, 1000 particles, σ=0.1, SGD lr 1e-4, 3000 iterations, θ₀=0.5.
    "influence": Setting(1, NEVER, 1000, 0.1, "sgd", 1e-4, 3000, (0.5,), "final", "none"),
    # PES paper §5.2: T=100, K=10, 100 particles, σ=0.3, Adam lr 1e-2, θ₀=(−4, −4).
    "toy2d": Setting(10, 100, 100, 0.3, "adam", 1e-2, 1000, (-4.0, -4.0), "mean", "truncate"),
    # Memoryless linear-quadratic problem (curvature 1), d=10, T=100, K=10.
    "linear": Setting(10, 100, 100, 0.1, "sgd", 1e-2, 500, (0.0,) * 10, "mean", "truncate"),
}


def make_problem(name: str, setting: Setting, seed: int = 0):
    """The synthetic problem `name` ('influence', 'toy2d' or 'linear')."""
    if name == "influence":
        return InfluenceBalancing()
    if name == "toy2d":
        return Toy2DRegression(horizon=setting.episode)
    if name == "linear":
        key = jax.random.PRNGKey(10_000 + seed)
        return LinearQuadratic.random(key, setting.episode, len(setting.theta0), curvature=1.0)
    raise ValueError(f"unknown problem {name!r}; known: {sorted(DEFAULTS)}")


def _outer(name: str, lr: float) -> optax.GradientTransformation:
    if name == "sgd":
        return optax.sgd(lr)
    if name == "adam":
        return optax.adam(lr)
    raise ValueError(f"unknown outer optimizer {name!r}; known: sgd, adam")


@jit(static_argnames=("outer_opt", "iterations"))
def _run_iterations(estimator, problem, state, outer_opt, iterations: int):
    """`iterations` outer steps in one scan, recording θ and the meta-objective."""

    def body(state, _):
        state, metrics = outer_step.__wrapped__(estimator, state, outer_opt)
        return state, (state.theta, problem.meta_objective(state.theta), metrics["meta_loss"])

    return jax.lax.scan(body, state, None, length=iterations)


def run_estimator(
    problem_name: str, estimator_name: str, setting: Setting, seed: int = 0
) -> dict[str, Any]:
    """Runs one estimator on one synthetic problem.

    Args:
      problem_name: 'influence', 'toy2d' or 'linear'.
      estimator_name: one of `meta_train.estimators.ESTIMATORS`.
      setting: window, particles, σ, outer optimizer, iterations, θ₀, objective, stagger.
      seed: seed of every random stream.

    Returns:
      JSON-friendly results: final θ and meta-objective, their trajectories, wall time.
    """
    problem = make_problem(problem_name, setting, seed)
    episode = setting.episode
    window = setting.window
    if estimator_name == "full_es":
        window = episode  # one estimate per whole episode
    schedule = EpisodeSchedule(window, episode, episode, whole_windows=False)
    estimator = make_estimator(
        estimator_name,
        (problem,),
        schedule,
        pairs_per_group=setting.particles,
        sigma=setting.sigma,
        objective=WindowObjective(setting.objective),
        stagger=setting.stagger if episode != NEVER else "none",
    )
    outer_opt = _outer(setting.outer_opt, setting.lr)
    theta0 = jnp.asarray(setting.theta0, jnp.float32)
    if theta0.shape == (1,):
        theta0 = theta0[0]
    t0 = time.perf_counter()
    state = init_learner(estimator, theta0, outer_opt, jax.random.PRNGKey(seed))
    _, (thetas, objectives, meta_losses) = _run_iterations(
        estimator, problem, state, outer_opt, setting.iterations
    )
    thetas, objectives = jax.device_get((thetas, objectives))
    seconds = time.perf_counter() - t0
    thetas = np.asarray(thetas, np.float64)
    return {
        "estimator": estimator_name,
        "window": window,
        "final_theta": thetas[-1].tolist(),
        "final_meta_objective": _num(objectives[-1]),
        "initial_meta_objective": _num(problem.meta_objective(theta0)),
        "theta": thetas.tolist(),
        "meta_objective": [_num(v) for v in np.asarray(objectives)],
        "seconds": seconds,
    }


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def plot(results: dict[str, Any], path: str) -> None:
    """θ (every coordinate) and the meta-objective against iterations, one colour per run."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (label, r) in enumerate(results["runs"].items()):
        th = np.asarray(r["theta"], np.float64)
        th = th.reshape(len(th), -1)
        for j in range(th.shape[1]):
            a1.plot(
                th[:, j],
                color=f"C{i}",
                lw=1.2,
                label=label if j == 0 else None,
                ls="-" if j == 0 else "--",
            )
        obj = np.array([np.nan if v is None else v for v in r["meta_objective"]])
        a2.plot(obj, color=f"C{i}", lw=1.2, label=label)
    if results.get("optimum") is not None:
        for v in np.ravel(results["optimum"])[:4]:
            a1.axhline(v, color="k", lw=0.8, ls=":")
        a1.plot([], [], color="k", lw=0.8, ls=":", label="optimum")
    a1.set(xlabel="iteration", ylabel="θ", title=f"{results['problem']}: θ")
    a2.set(xlabel="iteration", ylabel="meta-objective", title="meta-objective")
    if (
        np.nanmin(
            [
                np.nanmin(np.array([np.nan if v is None else v for v in r["meta_objective"]]))
                for r in results["runs"].values()
            ]
        )
        > 0
    ):
        a2.set_yscale("log")
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_EXAMPLES = """\
examples:
  %(prog)s --problem influence
  %(prog)s --problem toy2d --estimators pes,es_single,tes
  %(prog)s --problem influence --estimators tbptt --window 100
"""


def main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """Runs the estimators on one synthetic problem, prints a summary and writes the results.

    Args:
      argv: the command line's arguments (default: `sys.argv[1:]`).
      prog: the program's name in usage lines (default: `python -m meta_train.synthetic`).

    Returns:
      The results (what `<out>/results.json` holds).
    """
    p = argparse.ArgumentParser(
        prog=prog or "python -m meta_train.synthetic",
        description=__doc__.split("\n")[0],
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--problem", choices=sorted(DEFAULTS), default="influence")
    p.add_argument(
        "--estimators",
        default="pes,es_single,tes,tbptt",
        help=f"comma-separated, from {','.join(ESTIMATORS)}",
    )
    for field in dataclasses.fields(Setting):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "theta0":
            p.add_argument(
                flag,
                type=lambda s: tuple(float(v) for v in s.split(",")),
                default=None,
                help="initial θ, comma-separated",
            )
        elif field.type in ("int", int):
            p.add_argument(flag, type=int, default=None)
        elif field.type in ("float", float):
            p.add_argument(flag, type=float, default=None)
        else:
            p.add_argument(flag, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/synthetic/<problem>)")
    args = p.parse_args(argv)

    base = DEFAULTS[args.problem]
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Setting)
        if getattr(args, f.name) is not None
    }
    setting = dataclasses.replace(base, **overrides)
    names = [e.strip() for e in args.estimators.split(",") if e.strip()]
    for e in names:
        if e not in ESTIMATORS:
            p.error(f"unknown estimator {e!r}; known: {', '.join(ESTIMATORS)}")
    out = Path(args.out or f"runs/synthetic/{args.problem}")
    out.mkdir(parents=True, exist_ok=True)

    problem = make_problem(args.problem, setting, args.seed)
    optimum = getattr(problem, "optimum", None)
    results: dict[str, Any] = {
        "problem": args.problem,
        "setting": dataclasses.asdict(setting),
        "seed": args.seed,
        "optimum": None if optimum is None else np.asarray(optimum).tolist(),
        "runs": {},
    }
    print(f"{args.problem}: {dataclasses.asdict(setting)}")
    print(f"{'estimator':<12} {'K':>5} {'final θ':>28} {'meta-objective':>16} {'seconds':>8}")
    for name in names:
        r = run_estimator(args.problem, name, setting, args.seed)
        label = f"{name} (K={r['window']})"
        results["runs"][label] = r
        th = np.ravel(r["final_theta"])
        th_s = ", ".join(f"{v:.4g}" for v in th[:3]) + (", …" if th.size > 3 else "")
        obj = r["final_meta_objective"]
        print(
            f"{name:<12} {r['window']:>5} {th_s:>28} {obj if obj is None else f'{obj:.4g}':>16} "
            f"{r['seconds']:>8.1f}"
        )
    (out / "results.json").write_text(json.dumps(results))
    plot(results, str(out / "curves.png"))
    print(f"wrote {out}/results.json and {out}/curves.png")
    return results


if __name__ == "__main__":
    from meta_train.cli import run_tool

    sys.exit(run_tool(main))
