"""Meta-train several variants of one configuration at equal budget and compare them.

The engine of `python -m evaluate.measure.compare_estimators` (variants differ in `meta.estimator`)
and `python -m evaluate.measure.compare_lopts` (variants differ in `[lopt]`). Every variant runs the
same config plus its own overrides, with the same number of outer steps; the budget in inner
steps (2 × pairs × window per outer step) is printed per variant, so a variant that changes
it shows. Each trained optimizer, at the step with the best meta-validation score (or the
last step where nothing is marked), is then evaluated on the same held-out tasks, with tuned
Adam as the reference. Writes `<out>/comparison.json`, `<out>/comparison.md` (the table),
`<out>/meta_loss.png` (meta-loss and estimator variance against inner steps) and `<out>/eval/`.
An interrupted comparison continues where it stopped when run again.

Each variant meta-trains in its own process (`python -m meta_train.main --no-eval`): XLA's
CPU backend keeps the memory maps of every program it compiled, and one process that
compiled the meta-training and validation programs of several variants ran out of maps
(LLVM "Cannot allocate memory", then a segfault, measured here after six variants).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from meta_train.build import build_run
from meta_train.checkpoint import saved_steps
from meta_train.config import load_config
from meta_train.devices import use_cpu_cores
from meta_train.logging import read_metrics


def _smooth(y: np.ndarray, width: int) -> np.ndarray:
    if width <= 1 or len(y) < width:
        return y
    return np.convolve(y, np.ones(width) / width, mode="valid")


def parse_variants(specs: Sequence[str]) -> dict[str, list[str]]:
    """`NAME=OVERRIDE[;OVERRIDE...]` strings → {name: [override, ...]} (order kept).

    Raises:
      ValueError: a spec without a name, or a repeated name.
    """
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"variant {spec!r}: expected NAME=section.key=value[;...]")
        if name in out:
            raise ValueError(f"variant name {name!r} given twice")
        out[name.strip()] = [o.strip() for o in rest.split(";") if o.strip()]
    return out


def compare(
    config_path: str,
    variants: dict[str, list[str]],
    outer_steps: int,
    out_dir: str,
    overrides: Sequence[str] = (),
    label: str = "variant",
) -> dict[str, Any]:
    """Meta-trains every variant for `outer_steps` and evaluates them on held-out tasks.

    Args:
      config_path: the base TOML config.
      variants: {name: overrides of that variant} (applied after `overrides`).
      outer_steps: outer steps of every variant.
      out_dir: where runs, tables and plots go (`<out_dir>/<name>/` per variant).
      overrides: overrides shared by every variant.
      label: the first column's title.

    Returns:
      {"rows": per-variant figures, "table": the markdown table}.
    """
    from evaluate.suite import run_suite  # noqa: PLC0415
    from lopt.export import as_optax  # noqa: PLC0415
    from meta_train.checkpoint import load_theta, pick_step  # noqa: PLC0415

    use_cpu_cores()  # as the main job
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves, learned, info, family, config, run = {}, {}, {}, None, None, None
    for name, own in variants.items():
        args = [
            *overrides,
            *own,
            f"meta.outer_steps={outer_steps}",
            f"run.out_dir='{out / name}'",
            f"run.name='compare-{name}'",
            "run.log_every=10",
        ]
        config = load_config(config_path, args)  # bad overrides fail here, before any run
        steps = saved_steps(str(out / name / "checkpoints"))
        if not steps or steps[-1] < outer_steps:  # a finished variant is not rerun
            cmd = [sys.executable, "-m", "meta_train.main", "--config", config_path, "--no-eval"]
            cmd += ["--resume"] if steps else []  # continue a cut-off comparison
            subprocess.run([*cmd, *args], check=True)
        run = build_run(config, family)
        family = run.family  # load the data once
        ckpt = str(out / name / "checkpoints")
        step = pick_step(ckpt)
        theta, _ = load_theta(ckpt, step=step)
        rows = read_metrics(str(out / name))
        per_outer = config.meta.inner_steps_per_outer_step
        train_rows = [r for r in rows if "meta_loss" in r]
        curves[name] = {
            "inner_steps": [r["step"] * per_outer for r in train_rows],
            "meta_loss": [r["meta_loss"] for r in train_rows],
            "estimate_variance": [r["estimate_variance"] for r in train_rows],
            "grad_cosine": [r["grad_cosine"] for r in train_rows],
            "inner_steps_per_s": [r.get("inner_steps_per_s", np.nan) for r in train_rows],
        }
        info[name] = {
            # Throughput of the variant's own run (from its metrics, so a reused variant
            # reports the run that trained it): drifts with the machine's load.
            "inner_steps_per_s": float(np.nanmedian(curves[name]["inner_steps_per_s"])),
            "inner_steps": outer_steps * per_outer,
            "step": step,
            "num_meta_params": int(sum(np.size(x) for x in jax.tree.leaves(theta))),
        }
        learned[name] = (lambda th, lo: lambda n: as_optax(lo, th, n))(theta, run.lopt)

    eval_cfg = config.eval
    horizon = eval_cfg.num_steps or config.meta.max_episode_len
    results = run_suite(family, learned, eval_cfg, run.held_out_key(), str(out / "eval"), horizon)

    rows = []
    for name in variants:
        ml = np.asarray(curves[name]["meta_loss"])
        tail = ml[-max(1, len(ml) // 10) :]
        s = results["summary"][name]
        rows.append(
            {
                label: name,
                "overrides": variants[name],
                "meta_params": info[name]["num_meta_params"],
                "inner_steps": info[name]["inner_steps"],
                "inner_steps_per_s": round(info[name]["inner_steps_per_s"]),
                "evaluated_step": info[name]["step"],
                "final_meta_loss": float(np.mean(tail)),
                "mean_estimate_variance": float(np.mean(curves[name]["estimate_variance"])),
                "mean_grad_cosine": float(np.mean(curves[name]["grad_cosine"][1:])),
                "held_out_mean_train_loss": s["mean_train_loss"]["mean"],
                "held_out_final_train_loss": s["final_train_loss"]["mean"],
                "held_out_valid_loss": s["final_valid_loss"]["mean"],
                "held_out_valid_loss_std": s["final_valid_loss"]["std"],
            }
        )
    adam = results["summary"]["adam"]
    lines = [
        f"| {label} | meta-params | inner steps | inner steps/s | step evaluated "
        "| meta-loss (last 10 %) | estimate variance | grad cosine | held-out mean train loss "
        "| final train loss | valid loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r[label]} | {r['meta_params']:,} | {r['inner_steps']:,} "
            f"| {r['inner_steps_per_s']:,} | {r['evaluated_step']} | {r['final_meta_loss']:.4f} "
            f"| {r['mean_estimate_variance']:.3g} | {r['mean_grad_cosine']:.3f} "
            f"| {r['held_out_mean_train_loss']:.4f} | {r['held_out_final_train_loss']:.4f} "
            f"| {r['held_out_valid_loss']:.4f} ± {r['held_out_valid_loss_std']:.4f} |"
        )
    lines.append(
        f"| *{results['labels']['adam']}* | | | | | | | | {adam['mean_train_loss']['mean']:.4f} "
        f"| {adam['final_train_loss']['mean']:.4f} | {adam['final_valid_loss']['mean']:.4f} "
        f"± {adam['final_valid_loss']['std']:.4f} |"
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
