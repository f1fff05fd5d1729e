"""Reports of the optimizer benchmark (`python -m evaluate.bench`): Markdown, figures, wandb.

Everything here reads the JSON-friendly results dict the benchmark assembles (non-finite
numbers are already None) and writes files; nothing trains or touches JAX arrays.

    paths = write_report(results, "runs/bench")  # results.json/.md, speedup.png, curves/
    print(format_markdown(results))

Speed-ups are over tuned Adam (`evaluate.bench.speedup`): steps Adam needs to reach its own best
loss ÷ steps the row needs to reach that loss; None with no candidate step means "never".
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evaluate.bench.baselines import file_name
from evaluate.suite import _as_float, _cell, _fmt_lr
from meta_train.logging import RunLogger, WandbError, _fmt_duration

ADAM = "adam"
WANDB_PROJECT = "lopt-bench"
NEVER_TEXT = "never"
NA = "n/a"

_READING_GUIDE = (
    "**How to read.** Speed-up = steps tuned Adam needs to reach its own best validation "
    "(training) loss ÷ steps this optimizer needs to reach that value, read off the mean curve "
    "over seeds; > 1 means faster than tuned Adam, which is 1.00× by definition. *never* = did "
    "not reach that loss within the horizon; it counts as 0 in the median and the IQM "
    "(interquartile mean: the mean of the middle half of tasks). Win rate = share of tasks "
    "with speed-up ≥ 1. Diverged = seeds with a non-finite number or a final training loss "
    "above the loss of their first steps. Step time = wall-clock time per step ÷ Adam's, "
    "measured in the same process (the fastest of 5 alternating probes each, up to 200 "
    "steps). "
    "Wall time (valid) = the median over tasks of the "
    "validation speed-up ÷ the step time: how much sooner, in seconds, it reaches tuned "
    "Adam's best validation loss (*never* counts as 0). The row *{fresh}* re-runs tuned "
    "Adam on fresh seeds (new init and batches): its distance from 1.00× is the noise level "
    "of these numbers."
)


# ---------------------------------------------------------------------------------------------
# Small formatters


def _fmt_x(x: float | None, digits: int = 2) -> str:
    """A ratio like `1.73×`; None -> n/a."""
    if x is None or not math.isfinite(x):
        return NA
    return f"{x:.{digits}f}×"


def _fmt_pct(x: float | None) -> str:
    return NA if x is None else f"{100 * x:.0f}%"


def _fmt_count(n: Any, total: Any) -> str:
    return NA if n is None or total is None else f"{n}/{total}"


def _fmt_never(valid: dict, train: dict) -> str:
    """`valid / train of tasks`, e.g. `0 / 1 of 9` (the two counts share the task count)."""
    nv, nt, n = valid.get("never"), train.get("never"), valid.get("tasks", train.get("tasks"))
    return f"{NA if nv is None else nv} / {NA if nt is None else nt} of {NA if n is None else n}"


def _esc(text: Any) -> str:
    """Text for a Markdown table cell (a '|' would end the cell)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_esc(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _label(results: dict, row: str) -> str:
    return results.get("row_labels", {}).get(row, row)


def _lr_grid(lrs: Sequence[float]) -> str:
    return "[" + ", ".join(_fmt_lr(lr) for lr in lrs) + "]"


def speed_up_kind(entry: dict | None) -> tuple[str, float | None]:
    """Classifies one `speed_up_valid`/`speed_up_train` entry of a run.

    Args:
      entry: the entry (None: no such entry, e.g. a missing run).

    Returns:
      `(kind, value)`: ('value', x) for a finite speed-up; ('never', None) when the row never
      reached Adam's best loss; ('inf', None) when it was there at step 0 and Adam was not
      (an infinite ratio, written as null); ('n/a', None) when there is nothing to compare
      (no entry, or Adam's own curve had no finite point).
    """
    if not entry:
        return NA, None
    s = entry.get("speed_up")
    if s is not None:
        return ("value", float(s)) if math.isfinite(s) else ("inf", None)
    if entry.get("target") is None:  # Adam diverged: no target to reach
        return NA, None
    if entry.get("candidate_steps") is None:
        return NEVER_TEXT, None
    return "inf", None  # JSON null from +inf: target reached at step 0


def _fmt_speed_up(entry: dict | None, digits: int = 2) -> str:
    kind, value = speed_up_kind(entry)
    if kind == "value":
        return _fmt_x(value, digits)
    return "∞" if kind == "inf" else kind


def _fmt_stat(stat: dict | None) -> str:
    """`mean ± std` with 4 decimals; a None mean says whether some seed diverged."""
    if not stat:
        return NA
    seeds = stat.get("seeds") or []
    # suite._cell reads 'all_finite', which the benchmark's stats carry as null seeds.
    return _cell({**stat, "all_finite": all(v is not None for v in seeds)})


# ---------------------------------------------------------------------------------------------
# Markdown


def _summary_table(results: dict) -> str:
    head = [
        "optimizer",
        "valid: median",
        "valid: IQM",
        "train: median",
        "train: IQM",
        "win rate (valid / train)",
        "never (valid / train)",
        "diverged",
        "step time",
        "wall time (valid): median",
    ]
    agg_all = results.get("aggregate", {})
    rows = []
    for row in results["rows"]:
        agg = agg_all.get(row, {})
        v, t = agg.get("valid", {}), agg.get("train", {})
        rows.append(
            [
                _label(results, row),
                _fmt_x(v.get("median")),
                _fmt_x(v.get("iqm")),
                _fmt_x(t.get("median")),
                _fmt_x(t.get("iqm")),
                f"{_fmt_pct(v.get('win_rate'))} / {_fmt_pct(t.get('win_rate'))}",
                _fmt_never(v, t),
                _fmt_count(agg.get("diverged"), agg.get("runs")),
                _fmt_x(agg.get("step_time_ratio_median")),
                _fmt_x(agg.get("wall_valid", {}).get("median")),
            ]
        )
    return _table(head, rows)


def _speedup_table(results: dict) -> str:
    head = ["task", *(_label(results, r) for r in results["rows"])]
    rows = []
    for task in results["tasks"]:
        cells = [task["name"]]
        for row in results["rows"]:
            run = task.get("runs", {}).get(row)
            if run is None:  # failed: listed under "Failed runs"
                cells.append(NA)
                continue
            cells.append(
                f"{_fmt_speed_up(run.get('speed_up_valid'))} "
                f"(train {_fmt_speed_up(run.get('speed_up_train'))})"
            )
        rows.append(cells)
    return _table(head, rows)


def _metric_column(task: dict) -> tuple[str, str]:
    if task.get("metric") == "bits_per_byte":
        return "test_bits_per_byte", "test bits/byte"
    return "test_accuracy", "test acc"


def _task_table(results: dict, task: dict) -> str:
    last_key, last_name = _metric_column(task)
    keys = ("train_loss", "valid_loss", "test_loss", last_key)
    head = ["optimizer", "train loss", "valid loss", "test loss", last_name, "diverged"]
    head.append("step time")
    rows = []
    for row in results["rows"]:
        run = task.get("runs", {}).get(row)
        if run is None:
            rows.append([_label(results, row), *[NA] * (len(head) - 1)])
            continue
        final = run.get("final", {})
        rows.append(
            [
                _label(results, row),
                *(_fmt_stat(final.get(k)) for k in keys),
                _fmt_count(run.get("diverged"), run.get("runs")),
                _fmt_x(run.get("step_time_ratio")),
            ]
        )
    return _table(head, rows)


def _baseline_names(results: dict) -> list[str]:
    """Baselines in the order of `rows` (then any others, in order of appearance)."""
    seen: dict[str, None] = {}
    for task in results["tasks"]:
        seen.update(dict.fromkeys(task.get("baselines", {})))
    return [r for r in results["rows"] if r in seen] + [b for b in seen if b not in results["rows"]]


def _fmt_baseline(b: dict | None) -> str:
    if not b:
        return NA
    if b.get("all_diverged"):
        return "all diverged"
    if b.get("lr") is None:
        return NA
    return _fmt_lr(b["lr"]) + (" (edge)" if b.get("at_grid_edge") else "")


def baseline_warnings(results: dict) -> list[str]:
    """One line per tuned baseline whose chosen learning rate is unreliable.

    Args:
      results: the benchmark's results dict.

    Returns:
      Warnings for winners at the edge of their grid (the optimum may lie outside it) and
      for baselines that diverged at every learning rate.
    """
    out = []
    for task in results["tasks"]:
        for name, b in task.get("baselines", {}).items():
            grid = _lr_grid(b.get("lrs", []))
            if b.get("all_diverged"):
                out.append(f"task {task['name']}: {name} diverged at every lr of its grid {grid}")
            elif b.get("at_grid_edge") and b.get("lr") is not None:
                side = "lowest" if b.get("lr_index") == 0 else "highest"
                out.append(
                    f"task {task['name']}: {name}'s best lr {_fmt_lr(b['lr'])} is at the edge "
                    f"of its grid {grid} (the {side}); the optimum may lie outside"
                )
    return out


def _baselines_section(results: dict) -> str:
    names = _baseline_names(results)
    if not names:
        return "No tuned baselines.\n"
    head = ["task", *(f"{_label(results, n)}: lr" for n in names)]
    rows = [
        [t["name"], *(_fmt_baseline(t.get("baselines", {}).get(n)) for n in names)]
        for t in results["tasks"]
    ]
    text = _table(head, rows)
    warns = baseline_warnings(results)
    if warns:
        text += "\n" + "".join(f"- warning: {w}\n" for w in warns)
    return text


def _reuse_note(results: dict) -> str:
    """How much of the run was reused: a resumed or cached run's wall time is not its cost."""
    cfg = results.get("config", {})
    if "jobs_run" not in cfg:
        return ""
    note = f" ({cfg['jobs_run']} jobs run, {cfg.get('jobs_reused', 0)} reused"
    total = results.get("job_seconds_total")
    if total is not None:
        note += f"; every job's own time, summed: {_fmt_duration(total)}"
    return note + ")"


def format_markdown(results: dict) -> str:
    """The benchmark's Markdown report.

    Sections: a header (suite, seeds, tasks, wall time); a summary table (one row per entry
    of `rows`: median and IQM speed-up on validation and training loss, win rate, "never"
    count, diverged runs, step time vs Adam); per-task speed-ups; per-task final metrics;
    the tuned baselines' learning rates with warnings; skipped tasks and failed runs; and
    a paragraph on how to read the numbers.

    Args:
      results: the benchmark's results dict (`evaluate.bench.results.assemble`; non-finite
        numbers None).

    Returns:
      The Markdown text.
    """
    cfg = results.get("config", {})
    tasks = results.get("tasks", [])
    wall = results.get("wall_time_s")
    parts = [
        f"# Optimizer benchmark: suite `{results.get('suite', '?')}`\n\n"
        f"{cfg.get('seeds', '?')} seeds, {len(tasks)} task{'' if len(tasks) == 1 else 's'}"
        + (f" ({len(results['skipped'])} skipped)" if results.get("skipped") else "")
        + f", wall time {NA if wall is None else _fmt_duration(wall)}"
        + _reuse_note(results)
        + ".\n",
        "## Summary: speed-up over tuned Adam\n\n" + _summary_table(results),
        "## Speed-up per task (validation loss, training loss in brackets)\n\n"
        + _speedup_table(results),
        "## Final metrics per task\n\nMean ± std over seeds of full-split metrics after "
        "training; step time is per step relative to Adam's.\n",
    ]
    for task in tasks:
        desc = task.get("description")
        parts.append(
            f"### {task['name']}\n\n"
            + (f"{desc}; " if desc else "")
            + f"{task.get('steps', '?')} steps.\n\n"
            + _task_table(results, task)
        )
    parts.append("## Tuned baselines: chosen learning rates\n\n" + _baselines_section(results))
    if results.get("skipped"):
        parts.append(
            "## Skipped tasks\n\n"
            + "".join(f"- {s['task']}: {s['reason']}\n" for s in results["skipped"])
        )
    if results.get("failed"):
        parts.append(
            "## Failed runs\n\n"
            + "".join(
                f"- {f['task']}, {_label(results, f['row'])}: {f['error']}\n"
                for f in results["failed"]
            )
        )
    parts.append(_READING_GUIDE.format(fresh=_label(results, "adam_fresh_seeds")) + "\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Figures


def _row_colors(results: dict) -> dict[str, str]:
    # One colour per row, the same in every figure.
    return {row: f"C{i % 10}" for i, row in enumerate(results["rows"])}


def plot_speedups(results: dict, path: str) -> None:
    """VeLO-style summary: per task, one horizontal bar of validation speed-up per row.

    Adam is left out (1 by definition; drawn as the vertical line at 1). A row that never
    reached Adam's best loss gets a short grey hatched stub labelled "never" at the left
    edge; missing runs are omitted. The x axis is logarithmic.

    Args:
      results: the benchmark's results dict.
      path: the PNG file to write.
    """
    # The object-oriented API renders with Agg and leaves pyplot's global state alone.
    from matplotlib.figure import Figure  # noqa: PLC0415 - matplotlib is slow to import
    from matplotlib.patches import Patch  # noqa: PLC0415
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: PLC0415

    rows = [r for r in results["rows"] if r != ADAM]
    tasks = results["tasks"]
    colors = _row_colors(results)
    bar_h, gap = 0.8, 0.8  # one bar per unit of y; gap between task groups
    group = len(rows) + gap
    fig = Figure(figsize=(8.0, 1.2 + 0.22 * group * max(len(tasks), 1)), layout="constrained")
    ax = fig.add_subplot()

    # (y, row, kind, value) of every bar, to set the x range before drawing.
    bars = []
    for i, task in enumerate(tasks):
        for j, row in enumerate(rows):
            run = task.get("runs", {}).get(row)
            if run is None:
                continue
            kind, value = speed_up_kind(run.get("speed_up_valid"))
            if kind != NA:
                bars.append((i * group + j, row, kind, value))
    finite = [v for _, _, k, v in bars if k == "value" and v > 0]
    lo = min([1.0, *finite]) / 2.0
    hi = max([1.0, *finite]) * 2.0
    # "never" stubs end here: 4 % of the axis in log space, whatever the range.
    stub = lo * (hi / lo) ** 0.04

    for y, row, kind, value in bars:
        if kind == "never":
            ax.barh(y, stub - lo, left=lo, height=bar_h, color="0.85", hatch="///",
                    edgecolor=colors[row], linewidth=0.8)  # fmt: skip
            ax.annotate(NEVER_TEXT, (stub, y), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=7, color="0.3")  # fmt: skip
            continue
        end = hi if kind == "inf" else max(value, lo)
        ax.barh(y, end - lo, left=lo, height=bar_h, color=colors[row])
        text = "∞" if kind == "inf" else _fmt_x(value)
        # Inside the bar's end when it reaches the right edge, else just after it.
        inside = end >= hi / 1.5
        ax.annotate(
            text,
            (end, y),
            xytext=(-3 if inside else 3, 0),  # a fixed gap in points, whatever the scale
            textcoords="offset points",
            va="center",
            ha="right" if inside else "left",
            fontsize=6,
            color="white" if inside else "0.2",
        )

    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    # Ticks read as ratios (0.5×, 1×, 2×) rather than powers of ten.
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axvline(1.0, color="k", lw=1.0, ls="--")
    centers = [i * group + (len(rows) - 1) / 2 for i in range(len(tasks))]
    ax.set_yticks(centers, [t["name"] for t in tasks], fontsize=8)
    for i in range(1, len(tasks)):  # faint separators between task groups
        ax.axhline(i * group - (gap + 1) / 2, color="0.85", lw=0.6)
    ax.set_ylim(len(tasks) * group - gap, -1)  # first task at the top
    ax.set_xlabel("speed-up over tuned Adam (validation loss; log scale; >1 is faster)")
    ax.grid(axis="x", which="both", alpha=0.25)
    ax.set_title(f"Speed-up over tuned Adam — suite {results.get('suite', '?')}", fontsize=10)
    if not tasks or not rows:
        ax.text(0.5, 0.5, "no tasks" if not tasks else "no rows", transform=ax.transAxes,
                ha="center")  # fmt: skip
    handles = [Patch(color=colors[r], label=_label(results, r)) for r in rows]
    if any(k == "never" for _, _, k, _ in bars):
        handles.append(Patch(facecolor="0.85", hatch="///", edgecolor="0.4", label=NEVER_TEXT))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3),
                   fontsize=7, frameon=False)  # fmt: skip
    fig.savefig(path, dpi=120)


def task_file_name(name: str) -> str:
    """A task's name made safe as a file name (`evaluate.bench.baselines.file_name`)."""
    return file_name(name)


def _mean_curve(curve: dict | None) -> np.ndarray:
    if not curve or curve.get("mean") is None:
        return np.zeros(0)
    return _as_float(curve["mean"])  # None (diverged there) -> NaN: a gap in the line


def _all_positive(ys: Sequence[np.ndarray]) -> bool:
    vals = np.concatenate([y[np.isfinite(y)] for y in ys] or [np.zeros(0)])
    return bool(vals.size) and bool((vals > 0).all())


def _adam_best(task: dict, split: str) -> float | None:
    """Adam's best mean loss on `split` ('valid'/'train'): the target of the speed-ups."""
    adam = task.get("runs", {}).get(ADAM)
    if adam is None:
        return None
    target = (adam.get(f"speed_up_{split}") or {}).get("target")
    if target is not None:
        return float(target)
    y = _mean_curve(adam.get(f"{split}_curve"))
    y = y[np.isfinite(y)]
    return float(y.min()) if y.size else None


def _plot_one_task(results: dict, task: dict, path: str) -> None:
    from matplotlib.figure import Figure  # noqa: PLC0415 - matplotlib is slow to import

    colors = _row_colors(results)
    fig = Figure(figsize=(11.0, 4.2), layout="constrained")
    ax_train, ax_valid = fig.subplots(1, 2)
    panels = (
        (ax_train, "train", task.get("train_steps", []), "training loss (mean over seeds)", "-"),
        (ax_valid, "valid", task.get("eval_steps", []), "validation loss (mean over seeds)", "o-"),
    )
    for ax, split, steps, title, style in panels:
        x = _as_float(steps)
        ys = []
        for row in results["rows"]:
            run = task.get("runs", {}).get(row)
            if run is None:
                continue
            y = _mean_curve(run.get(f"{split}_curve"))
            if y.size != x.size or not y.size:
                continue
            label = _label(results, row)
            if run.get("diverged"):
                label += f" [{run['diverged']}/{run.get('runs', '?')} diverged]"
            ax.plot(x, y, style, color=colors[row], ms=3, lw=1.0, label=label)
            ys.append(y)
        best = _adam_best(task, split)
        if best is not None:
            ax.axhline(best, color="0.3", ls=":", lw=1.0, label=f"Adam's best {split} loss")
        if _all_positive(ys):  # cross-entropy spans decades over training
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if ys:
            ax.legend(fontsize=7)
    desc = task.get("description")
    fig.suptitle(task["name"] + (f": {desc}" if desc else ""), fontsize=10)
    fig.savefig(path, dpi=110)


def plot_task_curves(results: dict, out_dir: str) -> list[str]:
    """One PNG per task: mean training and validation loss curves of every row.

    Args:
      results: the benchmark's results dict.
      out_dir: the folder for the PNGs (created if missing); each is named after its task
        (`task_file_name`, with a numeric suffix if two names collide).

    Returns:
      The paths written, in task order.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths, used = [], set()
    for task in results["tasks"]:
        stem = base = task_file_name(task["name"])
        k = 1
        while stem in used:
            k += 1
            stem = f"{base}-{k}"
        used.add(stem)
        path = os.path.join(out_dir, stem + ".png")
        with warnings.catch_warnings():
            # Log-scale limits of an almost-empty panel warn; the figure is still right.
            warnings.simplefilter("ignore", UserWarning)
            _plot_one_task(results, task, path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# wandb


def summary_values(results: dict) -> dict[str, float | int | None]:
    """The aggregate numbers as flat keys for a run summary (`speed_up_valid_median/<row>`).

    Args:
      results: the benchmark's results dict.

    Returns:
      key -> number or None: per row, median and IQM speed-up, win rate and never count on
      validation and training loss, diverged and total runs, median step-time ratio and
      median wall-time speed-up on validation loss; plus
      counts of tasks, skipped tasks and failed runs, and the wall time.
    """
    out: dict[str, float | int | None] = {
        "num_tasks": len(results.get("tasks", [])),
        "num_skipped": len(results.get("skipped", [])),
        "num_failed": len(results.get("failed", [])),
        "wall_time_s": results.get("wall_time_s"),
    }
    for row in results["rows"]:
        agg = results.get("aggregate", {}).get(row, {})
        for split in ("valid", "train"):
            a = agg.get(split, {})
            out[f"speed_up_{split}_median/{row}"] = a.get("median")
            out[f"speed_up_{split}_iqm/{row}"] = a.get("iqm")
            out[f"win_rate_{split}/{row}"] = a.get("win_rate")
            out[f"never_{split}/{row}"] = a.get("never")
        out[f"diverged/{row}"] = agg.get("diverged")
        out[f"runs/{row}"] = agg.get("runs")
        out[f"step_time_ratio_median/{row}"] = agg.get("step_time_ratio_median")
        out[f"wall_speed_up_valid_median/{row}"] = agg.get("wall_valid", {}).get("median")
    return out


def _wandb_tables(results: dict) -> dict[str, Any]:
    import wandb  # noqa: PLC0415 - heavy; only when logging to wandb

    # Numbers, not formatted strings, so the tables sort and plot in the wandb UI.
    cols = ["row", "label"]
    cols += [f"speed_up_{s}_{a}" for s in ("valid", "train") for a in ("median", "iqm")]
    cols += ["win_rate_valid", "win_rate_train", "never_valid", "never_train", "tasks"]
    cols += ["diverged", "runs", "step_time_ratio_median"]
    summary = []
    for row in results["rows"]:
        agg = results.get("aggregate", {}).get(row, {})
        v, t = agg.get("valid", {}), agg.get("train", {})
        summary.append(
            [row, _label(results, row), v.get("median"), v.get("iqm"), t.get("median")]
            + [t.get("iqm"), v.get("win_rate"), t.get("win_rate"), v.get("never")]
            + [t.get("never"), v.get("tasks"), agg.get("diverged"), agg.get("runs")]
            + [agg.get("step_time_ratio_median")]
        )
    # Long format (one line per task × row): filterable by either.
    per_task = []
    for task in results["tasks"]:
        for row in results["rows"]:
            run = task.get("runs", {}).get(row)
            kv, vv = speed_up_kind(run.get("speed_up_valid") if run else None)
            kt, vt = speed_up_kind(run.get("speed_up_train") if run else None)
            per_task.append(
                [task["name"], row, _label(results, row), run is not None, vv, kv, vt, kt]
                + [run.get("step_time_ratio") if run else None]
            )
    return {
        "summary": wandb.Table(columns=cols, data=summary),
        "speed_up_per_task": wandb.Table(
            columns=["task", "row", "label", "ran", "speed_up_valid", "valid_kind"]
            + ["speed_up_train", "train_kind", "step_time_ratio"],
            data=per_task,
        ),
    }


def log_to_wandb(
    results: dict, out_dir: str, mode: str = "offline", figures: list[str] | None = None
) -> str | None:
    """Logs the report to a wandb run (offline by default) via `meta_train.logging.RunLogger`.

    The run (project 'lopt-bench', config = results["config"] plus the suite) gets the
    summary and per-task speed-up tables as `wandb.Table`s, `figures` as `wandb.Image`s,
    and the aggregate numbers (`summary_values`) in its summary; RunLogger also writes them
    to out_dir/summary.json, in every mode.

    Args:
      results: the benchmark's results dict.
      out_dir: the report folder; an offline run lives in out_dir/wandb/offline-run-*.
      mode: 'offline', 'online' or 'disabled' (no wandb at all).
      figures: PNG paths to log, each under its file name without extension.

    Returns:
      The wandb run's directory, or None when disabled.

    Raises:
      WandbError: wandb failed to start, log or finish.
    """
    config = {**results.get("config", {}), "suite": results.get("suite")}
    logger = RunLogger(out_dir, config, mode=mode, project=WANDB_PROJECT)
    run_dir, uses_wandb = None, logger.run is not None
    try:
        logger.summary(summary_values(results))
        if uses_wandb:
            import wandb  # noqa: PLC0415 - heavy; RunLogger imported it already

            # run.dir is the run's files/ folder; its parent holds the whole run.
            run_dir = str(Path(logger.run.dir).parent)
            payload = _wandb_tables(results)
            for fig in figures or []:
                payload[f"figures/{Path(fig).stem}"] = wandb.Image(fig)
            logger.run.log(payload)
    except Exception as e:
        logger.finish(exit_code=1)
        if not uses_wandb or isinstance(e, WandbError):  # not wandb's failure, or wrapped
            raise
        raise WandbError(f"logging the benchmark report to wandb ({mode}) failed: {e}") from e
    try:
        logger.finish()
    except Exception as e:  # wandb's finish syncs/flushes and may fail in its own ways
        raise WandbError(f"finishing the wandb run ({mode}) failed: {e}") from e
    # Nothing is logged per step: drop the empty metrics.jsonl RunLogger opened.
    if logger.metrics_path.exists() and not logger.metrics_path.stat().st_size:
        logger.metrics_path.unlink()
    return run_dir


# ---------------------------------------------------------------------------------------------
# Everything


def write_report(results: dict, out_dir: str, wandb_mode: str = "offline") -> dict[str, str]:
    """Writes the whole report into out_dir and logs it to wandb.

    Files: results.json (strict JSON: the input unchanged), results.md (`format_markdown`),
    speedup.png (`plot_speedups`), curves/<task>.png (`plot_task_curves`), summary.json
    (aggregates, via RunLogger) and the wandb run (`log_to_wandb`).

    Args:
      results: the benchmark's results dict (JSON-friendly: non-finite numbers None).
      out_dir: the folder (created if missing).
      wandb_mode: 'offline', 'online' or 'disabled'.

    Returns:
      What was written: name relative to out_dir (e.g. 'results.md', 'curves/x.png') -> path;
      'wandb' -> the wandb run's directory unless disabled.

    Raises:
      ValueError: results hold a non-finite float (the schema writes those as None).
      WandbError: wandb failed.
    """
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    path = os.path.join(out_dir, "results.json")
    # Serialise first: a NaN that slipped through fails here, before a partial file exists.
    text = json.dumps(results, allow_nan=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    written["results.json"] = path

    path = os.path.join(out_dir, "results.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(format_markdown(results))
    written["results.md"] = path

    path = os.path.join(out_dir, "speedup.png")
    plot_speedups(results, path)
    written["speedup.png"] = path
    curves = plot_task_curves(results, os.path.join(out_dir, "curves"))
    written.update({f"curves/{os.path.basename(p)}": p for p in curves})

    run_dir = log_to_wandb(results, out_dir, wandb_mode, figures=[written["speedup.png"], *curves])
    written["summary.json"] = os.path.join(out_dir, "summary.json")
    if run_dir is not None:
        written["wandb"] = run_dir
    return written
