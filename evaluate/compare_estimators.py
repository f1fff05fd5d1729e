"""Compare outer-gradient estimators on a learned-optimizer task family at equal budget.

    python -m evaluate.compare_estimators --config configs/default.toml \
        --estimators pes,es_single,tes --outer-steps 2000 --out runs/compare

Every estimator meta-trains the same learned optimizer from the same θ₀ on the same task
family with the same number of antithetic pairs and window, so each spends the same inner
steps per outer step (2 × pairs × K) and the same total budget. Then each trained optimizer
is evaluated on the same held-out tasks (with tuned Adam as a reference). Writes
`<out>/comparison.json`, `<out>/comparison.md` (the table) and `<out>/meta_loss.png` (the
meta-loss curves, smoothed, against inner steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from meta_train.build import build_run
from meta_train.config import load_config
from meta_train.devices import use_cpu_cores
from meta_train.logging import read_metrics
from meta_train.main import meta_train


def _smooth(y: np.ndarray, width: int) -> np.ndarray:
    if width <= 1 or len(y) < width:
        return y
    return np.convolve(y, np.ones(width) / width, mode="valid")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m evaluate.compare_estimators", description=__doc__.split("\n")[0]
    )
    p.add_argument("--config", default="configs/default.toml")
    p.add_argument("--estimators", default="pes,es_single,tes")
    p.add_argument("--outer-steps", type=int, default=2000)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    args = p.parse_args(argv)
    use_cpu_cores()  # as the main job
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [e.strip() for e in args.estimators.split(",") if e.strip()]

    from evaluate.suite import run_suite  # noqa: PLC0415
    from lopt.export import as_optax  # noqa: PLC0415

    curves, learned, info, family = {}, {}, {}, None
    for name in names:
        config = load_config(
            args.config,
            [
                *args.overrides,
                f"meta.estimator='{name}'",
                f"meta.outer_steps={args.outer_steps}",
                f"run.out_dir='{out / name}'",
                f"run.name='compare-{name}'",
                "run.log_every=10",
                f"run.checkpoint_every={args.outer_steps}",
            ],
        )
        run = build_run(config, family)
        family = run.family  # load the data once
        t0 = time.perf_counter()
        state, _ = meta_train(run, resume="allow")  # continue a cut-off comparison
        seconds = time.perf_counter() - t0
        rows = read_metrics(str(out / name))
        m = config.meta
        per_outer = m.inner_steps_per_outer_step
        curves[name] = {
            "inner_steps": [r["step"] * per_outer for r in rows],
            "meta_loss": [r["meta_loss"] for r in rows],
            "estimate_variance": [r["estimate_variance"] for r in rows],
            "grad_cosine": [r["grad_cosine"] for r in rows],
        }
        info[name] = {"seconds": seconds, "inner_steps": args.outer_steps * per_outer}
        learned[name] = (lambda th, lo: lambda n: as_optax(lo, th, n))(state.theta, run.lopt)

    eval_cfg = config.eval
    horizon = eval_cfg.num_steps or config.meta.max_episode_len
    results = run_suite(family, learned, eval_cfg, run.held_out_key(), str(out / "eval"), horizon)

    rows = []
    for name in names:
        ml = np.asarray(curves[name]["meta_loss"])
        tail = ml[-max(1, len(ml) // 10) :]
        s = results["summary"][name]
        rows.append(
            {
                "estimator": name,
                "inner_steps": info[name]["inner_steps"],
                "seconds": round(info[name]["seconds"], 1),
                "final_meta_loss": float(np.mean(tail)),
                "mean_estimate_variance": float(np.mean(curves[name]["estimate_variance"])),
                "mean_grad_cosine": float(np.mean(curves[name]["grad_cosine"][1:])),
                "held_out_mean_train_loss": s["mean_train_loss"]["mean"],
                "held_out_final_train_loss": s["final_train_loss"]["mean"],
                "held_out_valid_loss": s["final_valid_loss"]["mean"],
            }
        )
    adam = results["summary"]["adam"]
    lines = [
        "| estimator | inner steps | meta-loss (last 10 %) | estimate variance | grad cosine | "
        "held-out mean train loss | final train loss | valid loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['estimator']} | {r['inner_steps']:,} | {r['final_meta_loss']:.4f} | "
            f"{r['mean_estimate_variance']:.3g} | {r['mean_grad_cosine']:.3f} | "
            f"{r['held_out_mean_train_loss']:.4f} | {r['held_out_final_train_loss']:.4f} | "
            f"{r['held_out_valid_loss']:.4f} |"
        )
    lines.append(
        f"| *{results['labels']['adam']}* | | | | | {adam['mean_train_loss']['mean']:.4f} | "
        f"{adam['final_train_loss']['mean']:.4f} | {adam['final_valid_loss']['mean']:.4f} |"
    )
    table = "\n".join(lines) + "\n"
    (out / "comparison.md").write_text(table)
    (out / "comparison.json").write_text(json.dumps({"rows": rows, "curves": curves}, indent=1))
    _plot(curves, str(out / "meta_loss.png"))
    print(table)
    print(f"wrote {out}/comparison.md, comparison.json, meta_loss.png and eval/")
    return {"rows": rows, "table": table}


def _plot(curves: dict, path: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (name, c) in enumerate(curves.items()):
        x = np.asarray(c["inner_steps"], float)
        y = np.asarray(c["meta_loss"], float)
        w = max(1, len(y) // 20)
        a1.plot(x[w - 1 :] if w > 1 else x, _smooth(y, w), color=f"C{i}", label=name)
        v = np.asarray(c["estimate_variance"], float)
        a2.plot(x[w - 1 :] if w > 1 else x, _smooth(v, w), color=f"C{i}", label=name)
    a1.set(
        xlabel="inner steps (all unrolls)",
        ylabel="meta-loss (smoothed)",
        title="meta-training loss at equal inner-step budget",
    )
    a2.set(
        xlabel="inner steps (all unrolls)",
        ylabel="trace variance of per-pair estimates",
        yscale="log",
        title="estimator variance",
    )
    a1.legend()
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
    sys.exit(0)
