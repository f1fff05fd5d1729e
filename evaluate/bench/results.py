"""Assembles finished benchmark jobs into one results dict (the schema of results.json).

Speed-ups are computed here, from the curves the jobs saved (means over seeds), against
tuned Adam on each task; then summarised across tasks (`evaluate.bench.speedup.aggregate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from evaluate.bench.baselines import LABELS
from evaluate.bench.runner import FRESH, Job, cached
from evaluate.bench.speedup import aggregate, coarsen, speed_up
from evaluate.bench.suites import BenchTask, Suite

REFERENCE = "adam"
# The training-loss speed-up reads curves merged into this many bins (5 % of the run each).
TRAIN_SPEEDUP_BINS = 20


def _metric(info: dict[str, Any], rows: dict[str, Any]) -> str:
    lm = info.get("kind") == "lm" or any("test_bits_per_byte" in r["final"] for r in rows.values())
    return "bits_per_byte" if lm else "accuracy"


def _curve(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], np.float64)


def _speed_ups(steps: Sequence[float], ref: dict | None, row: dict, which: str) -> dict:
    if ref is None:
        return {"speed_up": None, "target": None, "reference_steps": None, "candidate_steps": None}
    ref_curve, row_curve = _curve(ref[which]["mean"]), _curve(row[which]["mean"])
    if which == "train_curve":
        _, ref_curve = coarsen(steps, ref_curve, TRAIN_SPEEDUP_BINS)
        steps, row_curve = coarsen(steps, row_curve, TRAIN_SPEEDUP_BINS)
    r = speed_up(steps, ref_curve, row_curve)
    if r["speed_up"] == float("inf"):  # at the target from step 0: JSON has no infinity
        r["speed_up"] = None  # with candidate_steps 0, the report shows it as ∞
    return r


def assemble(
    suite: Suite,
    tasks: Sequence[BenchTask],
    specs: Sequence[Any],
    jobs: Sequence[Job],
    skipped: list[dict[str, str]],
    failed: list[dict[str, str]],
    config: dict[str, Any],
    ran: set[str] = frozenset(),
) -> dict[str, Any]:
    """The results dict of a benchmark whose jobs have run.

    Args:
      suite: the suite (its baselines fix the row order).
      tasks: the tasks that ran (skipped ones are only named in `skipped`).
      specs: the candidates (`evaluate.bench.specs.OptimizerSpec`), in command-line order.
      jobs: every job of the run (finished ones have a result file with their key).
      skipped: {'task', 'reason'} of tasks whose data are missing.
      failed: {'task', 'row', 'error'} of jobs that raised.
      config: the run's settings, stored as results['config'].
      ran: result paths of the jobs this invocation ran (other baselines came from the cache).

    Returns:
      The results: what results.json holds (written by `evaluate.bench.report.write_report`).
    """
    candidates = [s.label for s in specs]
    rows = [*candidates, *(b.name for b in suite.baselines), FRESH]
    row_labels = {c: c for c in candidates}
    row_labels.update({b.name: LABELS[b.name] for b in suite.baselines})
    row_labels[FRESH] = "Adam (tuned), fresh seeds"

    by_task: dict[str, list[Job]] = {}
    for j in jobs:
        by_task.setdefault(j.task.name, []).append(j)
    failed = list(failed)
    out_tasks = []
    job_seconds = 0.0
    for task in tasks:
        entry: dict[str, Any] = {
            "name": task.name,
            "steps": task.steps,
            "description": task.description,
            "baselines": {},
            "runs": {},
        }
        info: dict[str, Any] = {}
        for job in by_task.get(task.name, []):
            res = cached(job)
            if res is None:
                if not any(f["task"] == task.name and f["row"] == job.row for f in failed) and all(
                    s["task"] != task.name for s in skipped
                ):
                    failed.append({"task": task.name, "row": job.row, "error": "no result"})
                continue
            info = res.get("info", info)
            job_seconds += float((res.get("baseline") or res).get("seconds") or 0.0)
            entry["eval_steps"], entry["train_steps"] = res["eval_steps"], res["train_steps"]
            if job.baseline is not None:
                b = dict(res["baseline"])
                b["cached"] = job.path not in ran
                entry["baselines"][job.row] = b
                entry["runs"].update(res["rows"])
            else:
                keep = ("final", "valid_curve", "train_curve", "diverged", "runs")
                entry["runs"][job.row] = {k: res[k] for k in keep}
                entry["runs"][job.row]["step_time_ratio"] = res.get("step_time_ratio")
                entry["runs"][job.row]["seconds"] = res.get("seconds")
        entry["kind"] = str(info.get("kind", task.kind))
        entry["info"] = info
        entry["metric"] = _metric(info, entry["runs"])
        ref = entry["runs"].get(REFERENCE)
        for run in entry["runs"].values():
            run["diverged"] = max(run["diverged"], count_diverged(run))
            run["speed_up_valid"] = _speed_ups(entry.get("eval_steps", []), ref, run, "valid_curve")
            run["speed_up_train"] = _speed_ups(
                entry.get("train_steps", []), ref, run, "train_curve"
            )
        # A stable order: the rows' order, whatever order the jobs finished in.
        entry["runs"] = {r: entry["runs"][r] for r in rows if r in entry["runs"]}
        out_tasks.append(entry)

    return {
        "suite": suite.name,
        "config": config,
        "candidates": candidates,
        "rows": rows,
        "row_labels": row_labels,
        "skipped": skipped,
        "failed": failed,
        "tasks": out_tasks,
        "aggregate": {r: _aggregate(out_tasks, r) for r in rows},
        # Training time of every job (this invocation's and reused ones), one core each.
        "job_seconds_total": round(job_seconds, 1),
    }


def count_diverged(run: dict[str, Any]) -> int:
    """Seeds of a row that diverged: a non-finite number, or a final full-split training
    loss above the loss of the run's first steps (finite but blown up: an optimizer that
    ends worse than where it started has not trained).

    Args:
      run: a row's record (`evaluate.bench.runner.row_record`).

    Returns:
      The count.
    """
    finals = run["final"]["train_loss"]["seeds"]
    trains, valids = run["train_curve"]["seeds"], run["valid_curve"]["seeds"]
    count = 0
    for final, train, valid in zip(finals, trains, valids, strict=True):
        start = train[0]
        non_finite = final is None or None in train or None in valid
        count += non_finite or (start is not None and final > start)
    return count


def _aggregate(tasks: list[dict[str, Any]], row: str) -> dict[str, Any]:
    """Summary of one row over the tasks where it and the reference both ran."""
    valid, train, ratios, wall = [], [], [], []
    diverged = runs = 0
    for t in tasks:
        run = t["runs"].get(row)
        if run is None:
            continue
        diverged += run["diverged"]
        runs += run["runs"]
        if run.get("step_time_ratio") is not None:
            ratios.append(run["step_time_ratio"])
        if REFERENCE not in t["runs"] or t["runs"][REFERENCE]["speed_up_valid"]["target"] is None:
            continue  # no reference point on this task: neither a win nor a loss
        valid.append(run["speed_up_valid"]["speed_up"])
        train.append(run["speed_up_train"]["speed_up"])
        ratio = run.get("step_time_ratio")
        if ratio:  # in seconds: the speed-up in steps over the cost of a step
            wall.append(None if valid[-1] is None else valid[-1] / ratio)
    return {
        "valid": aggregate(valid),
        "train": aggregate(train),
        # Over the tasks with a measured step time (every task of a normal run).
        "wall_valid": aggregate(wall),
        "diverged": diverged,
        "runs": runs,
        "step_time_ratio_median": float(np.median(ratios)) if ratios else None,
    }
