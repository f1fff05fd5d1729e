"""The optimizer benchmark: any optimizer against per-task tuned baselines on a named suite.

    python -m evaluate.bench --optimizer SPEC [--optimizer SPEC ...] --suite NAME
                             [--steps N] [--seeds S] [--workers W] [--out DIR]

SPEC: a checkpoint directory, a shipped optimizer's name (`mnist1d-mlp-pes`), an optax
optimizer with its settings (`optax:adam(learning_rate=1e-3)`) or `module:function`
returning an optax transformation (see `evaluate.bench.specs`). Suites: `quick`, `classic`,
`in_family` (held-out tasks of a meta-training config: `--config`, or the first checkpoint
SPEC's own), or a suite file (see `evaluate.bench.suites`).

Per task, Adam, Adam with warm-up and cosine decay, and SGD with momentum are each tuned
over a learning-rate grid on validation loss (cached on disk: a new candidate trains only
itself). The headline number is the speed-up over tuned Adam (`evaluate.bench.speedup`), with
tuned Adam re-run on fresh seeds as the noise reference. Writes results.json, results.md,
speedup.png, curves/*.png and a wandb run (offline by default) into the output folder; an
interrupted run resumes when the same command is run again.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import fnmatch
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from meta_train.cli import UserError

RESERVED = ("adam", "adam_cosine", "sgdm", "adam_fresh_seeds")


_EXAMPLES = """\
examples:
  %(prog)s --optimizer mnist1d-mlp-pes --suite quick
  %(prog)s --optimizer runs/default/checkpoints \\
      --optimizer 'adam3=optax:adam(learning_rate=3e-3)' --suite classic --steps 1000
  %(prog)s --optimizer runs/default/checkpoints --suite in_family
"""


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """Parses the command line.

    Args:
      argv: the arguments (default: `sys.argv[1:]`).
      prog: the program's name in usage lines (default: `python -m evaluate.bench`).

    Returns:
      The parsed arguments.
    """
    p = argparse.ArgumentParser(
        prog=prog or "python -m evaluate.bench",
        description=__doc__.split("\n")[0],
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--optimizer",
        action="append",
        required=True,
        metavar="SPEC",
        help="optimizer to benchmark (repeat to compare several); [LABEL=]SPEC",
    )
    p.add_argument("--suite", required=True, help="quick, classic, in_family or a suite .toml")
    p.add_argument(
        "--steps", type=int, default=None, help="every task's horizon (default: the suite's)"
    )
    p.add_argument(
        "--seeds", type=int, default=None, help="seeds per task (default: the suite's, 3)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="worker processes, one per core (default: every core this process may use)",
    )
    p.add_argument("--out", default=None, help="output folder (default: runs/bench/SUITE)")
    p.add_argument("--tasks", default=None, help="only tasks whose name matches this glob")
    p.add_argument(
        "--config", default=None, help="meta-training config whose family in_family uses"
    )
    p.add_argument("--data-dir", default=None, help="look for dataset files here first")
    p.add_argument(
        "--cache-dir", default=None, help="baseline cache (default: ~/.cache/lopt/bench)"
    )
    p.add_argument(
        "--wandb-mode", default="offline", choices=("offline", "online", "disabled"), help="wandb"
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return p.parse_args(argv)


def _family_config(args: argparse.Namespace, specs: list) -> Any:
    """The meta-training config for `in_family`: --config, else the first checkpoint's."""
    from meta_train.config import from_dict, load_config  # noqa: PLC0415

    if args.config:
        return load_config(args.config)
    for s in specs:
        if s.kind == "checkpoint":
            from meta_train.checkpoint import load_theta  # noqa: PLC0415

            _, saved = load_theta(s.target)
            return from_dict(copy.deepcopy(saved))
    return None


def _check_args(args: argparse.Namespace) -> None:
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1; got {args.steps}")
    if args.seeds is not None and args.seeds < 1:
        raise UserError(f"--seeds must be >= 1; got {args.seeds}")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1; got {args.workers}")
    if args.config and args.suite != "in_family":
        raise UserError("--config chooses the family of --suite in_family; other suites ignore it")


def _specs(texts: list[str]) -> list:
    from evaluate.bench.specs import check, parse_spec  # noqa: PLC0415

    specs = [parse_spec(t) for t in texts]
    labels = [s.label for s in specs]
    for s in specs:
        if s.label in RESERVED:
            raise UserError(f"label {s.label!r} is taken by a baseline row; use LABEL=SPEC")
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise UserError(
            f"two optimizers share the label(s) {dupes}; use LABEL=SPEC to tell them apart"
        )
    for s in specs:
        check(s)  # build each once here: a bad SPEC fails before any training
    return specs


def _spec_identity(spec: Any) -> str:
    """What else determines a SPEC's optimizer: a checkpoint's saved steps and the step it
    loads (the best-marked one, which can move between existing steps); a shipped
    optimizer's index entry (its weights' hash, step and settings, which a new release
    changes under the same name)."""
    if spec.kind == "shipped":
        from lopt.hub import _index  # noqa: PLC0415

        return json.dumps(_index()[spec.target], sort_keys=True)
    if spec.kind != "checkpoint":
        return ""
    from meta_train.checkpoint import pick_step, saved_steps  # noqa: PLC0415

    target = spec.target
    return json.dumps([str(Path(target).resolve()), saved_steps(target), pick_step(target)])


def _bench(args: argparse.Namespace) -> int:
    from evaluate.bench import runner  # noqa: PLC0415
    from evaluate.bench.baselines import default_cache_dir, file_name, versions  # noqa: PLC0415
    from evaluate.bench.report import format_markdown, write_report  # noqa: PLC0415
    from evaluate.bench.suites import get_suite, missing_data  # noqa: PLC0415
    from meta_train.logging import ProgressBar  # noqa: PLC0415

    t_start = time.perf_counter()
    _check_args(args)
    specs = _specs(args.optimizer)
    suite = get_suite(
        args.suite, _family_config(args, specs) if args.suite == "in_family" else None
    )
    suite = suite.with_overrides(args.steps, args.seeds)
    tasks = list(suite.tasks)
    if args.tasks:
        tasks = [t for t in tasks if fnmatch.fnmatch(t.name, args.tasks)]
        if not tasks:
            names = ", ".join(t.name for t in suite.tasks)
            raise UserError(f"--tasks {args.tasks!r} matches no task of {suite.name!r}: {names}")
    out = Path(args.out or Path("runs") / "bench" / suite.name)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    settings = runner.Settings(suite.seeds, suite.eval_points, suite.train_bins, args.data_dir)

    skipped, runnable = [], []
    for t in tasks:
        reason = missing_data(t, args.data_dir)
        if reason:
            print(f"skipping {t.name}: {reason}", file=sys.stderr)
            skipped.append({"task": t.name, "reason": reason})
        else:
            runnable.append(t)

    jobs: list[runner.Job] = []
    for t in runnable:
        for base in suite.baselines:
            jobs.append(runner.baseline_job(t, base, settings, str(cache_dir)))
        for s in specs:
            key = runner.candidate_key(t, s.spec, settings, _spec_identity(s))
            path = out / "jobs" / file_name(t.name) / f"{file_name(s.label)}-{key[:12]}.json"
            jobs.append(runner.Job(t, s.label, s.spec, None, str(path), key))

    todo = [j for j in jobs if runner.cached(j) is None]
    done_before = len(jobs) - len(todo)
    print(
        f"{suite.name}: {len(runnable)} tasks ({len(skipped)} skipped), {len(jobs)} jobs, "
        f"{done_before} already done (cache or earlier run), {len(todo)} to run on "
        f"{min(args.workers, max(1, len(todo)))} worker(s)",
        file=sys.stderr,
    )
    bar = ProgressBar(sum(j.cost(suite.seeds) for j in todo) or 1, desc="bench", unit="work units")
    failed: list[dict[str, str]] = []
    finished = [0]

    def on_done(i: int, status: str, detail: Any) -> None:
        job = todo[i]
        finished[0] += 1
        if status == "skipped":  # data vanished between the check and the load
            if all(s["task"] != job.task.name for s in skipped):
                skipped.append({"task": job.task.name, "reason": str(detail)})
        elif status == "error":
            first = str(detail).strip().splitlines()[0] if str(detail).strip() else "error"
            failed.append({"task": job.task.name, "row": job.row, "error": first})
            print(f"\n{job.task.name} / {job.row} failed:\n{detail}", file=sys.stderr)
        bar.update(job.cost(suite.seeds), jobs_done=finished[0])

    t_jobs = time.perf_counter()
    try:
        runner.run_jobs(todo, settings, args.workers, on_done)
    finally:
        bar.close()
    jobs_seconds = time.perf_counter() - t_jobs

    from evaluate.bench.results import assemble  # noqa: PLC0415

    results = assemble(
        suite,
        runnable,
        specs,
        jobs,
        skipped,
        failed,
        ran={j.path for j in todo},
        config={
            "seeds": suite.seeds,
            "eval_points": suite.eval_points,
            "train_bins": suite.train_bins,
            "workers": args.workers,
            "steps_override": args.steps,
            "versions": versions(),
            "cache_dir": str(cache_dir),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "jobs_run": len(todo),
            "jobs_reused": done_before,
            "jobs_seconds": round(jobs_seconds, 1),
            "baselines": {b.name: list(b.lrs) for b in suite.baselines},
            "optimizers": {s.label: s.spec for s in specs},
        },
    )
    results["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    written = write_report(results, str(out), args.wandb_mode)
    print(format_markdown(results))
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 1 if failed else 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Runs the benchmark.

    Args:
      argv: the command line's arguments (default: `sys.argv[1:]`).
      prog: the program's name in usage and error lines (default: `python -m evaluate.bench`).

    Returns:
      The exit status: 0, 2 after a user error, 1 if a job failed.
    """
    args = parse_args(argv, prog)
    from meta_train.cli import run_cli  # noqa: PLC0415

    return run_cli(lambda: _bench(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
