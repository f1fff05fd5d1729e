"""Runs the benchmark's jobs: one optimizer (or one tuned baseline) on one task.

A job trains all its seeds (and, for a baseline, its whole learning-rate grid) in one
jitted, vmapped `lax.scan` (`evaluate.suite._train`): data on the device, batches drawn
with `jax.random` inside the scan. Every optimizer sees the same seed keys on a task, so
the same initial parameters and minibatches (common random numbers); the noise reference
re-runs tuned Adam with fresh keys.

Jobs run in worker processes pinned one per core (`run_jobs`): on small CPU problems one
single-threaded process per core beats one process whose kernels XLA splits over the cores,
and independent jobs need no synchronisation. Each finished job is written to disk at once
(baselines to the cache, candidates to the output folder), so an interrupted benchmark
resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait as wait_for_messages
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from evaluate.bench.baselines import (
    BASELINE_VERSION,
    Baseline,
    cache_key,
    cache_path,
    read_cache,
    write_json_atomic,
)
from evaluate.bench.speedup import smooth_bins
from evaluate.bench.suites import BenchTask
from evaluate.suite import _num, _train, eval_steps, select_lr, train_seeds, train_step
from lopt.xla_options import CPU_OPTIONS
from meta_train.jit import jit
from tasks.epochs import steps_per_epoch

FRESH = "adam_fresh_seeds"
# Steps of the wall-clock probe that compares an optimizer's step time with Adam's.
PROBE_STEPS = 200
# Alternating probe pairs; the step-time column is the ratio of each loop's fastest probe.
PROBE_ROUNDS = 5
# How the step-time column is measured, in candidates' cache keys: a changed method reruns.
PROBE_METHOD = f"fastest of {PROBE_ROUNDS} alternating pairs of {PROBE_STEPS} steps"
# Rough cost of a step per kind relative to a small MLP's, for the ETA only.
_KIND_COST = {"mlp": 1.0, "conv": 5.0, "lm": 5.0, "family": 2.0}
_FINAL = ("loss", "accuracy", "bits_per_byte")


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of work.

    Attributes:
      task: the task.
      row: the row it fills: a candidate's label, or a baseline's name.
      spec: the candidate's SPEC string (None for a baseline).
      baseline: the baseline (None for a candidate).
      path: where the finished result is written (and looked up on resume).
      key: the content hash stored in that file; a file with another key is stale.
    """

    task: BenchTask
    row: str
    spec: str | None
    baseline: Baseline | None
    path: str
    key: str

    @property
    def runs(self) -> int:
        return len(self.baseline.lrs) + 1 if self.baseline else 1

    def cost(self, seeds: int) -> int:
        """Estimated work in small-MLP training steps, for the progress bar's ETA."""
        return max(
            1, round(self.task.steps * seeds * self.runs * _KIND_COST.get(self.task.kind, 1.0))
        )


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every job of a benchmark shares."""

    seeds: int
    eval_points: int
    train_bins: int
    data_dir: str | None = None


def eval_every(steps: int, eval_points: int) -> int:
    """The validation period giving about `eval_points` evaluations over `steps`."""
    return max(1, steps // max(1, eval_points))


def seed_keys(task_name: str, seeds: int, fresh: bool = False):
    """The seed keys of a task: the same for every optimizer (common random numbers).

    Args:
      task_name: the task's name (its hash seeds the keys).
      seeds: how many.
      fresh: the noise reference's independent keys instead.

    Returns:
      [seeds] keys.
    """
    base = jax.random.PRNGKey(zlib.crc32(task_name.encode()))
    return jax.random.split(jax.random.fold_in(base, 1 if fresh else 0), seeds)


def candidate_key(task: BenchTask, spec: str, settings: Settings, identity: str = "") -> str:
    """Content hash of a candidate job's result (a changed input never reuses a file)."""
    blob = json.dumps(
        {
            "version": BASELINE_VERSION,
            "task": {k: v for k, v in task.to_json().items() if k != "description"},
            "spec": spec,
            "identity": identity,
            "seeds": settings.seeds,
            "eval_points": settings.eval_points,
            "train_bins": settings.train_bins,
            "probe": PROBE_METHOD,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def data_fingerprint(built: Any) -> str:
    """A hash of a built task's on-device data (what a baseline's cache entry depends on)."""
    h = hashlib.sha256()
    # Array leaves only: the tree's static parts print with memory addresses, and the
    # task's JSON description already fixes the structure.
    for leaf in jax.tree.leaves(built):
        a = np.asarray(leaf)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:24]


# ------------------------------------------------------------------------- the computations


@jit(cpu_options=CPU_OPTIONS, static_argnames=("baseline", "num_steps", "period"))
def _grid(task, baseline, lrs, num_steps, keys, period):
    """A baseline's whole learning-rate grid x seeds in one call (the rate is traced)."""

    def one(lr, key):
        return _train(task, baseline.transform(lr, num_steps), num_steps, key, period)

    lrs = jnp.asarray(lrs, jnp.float32)
    return jax.vmap(lambda lr: jax.vmap(lambda k: one(lr, k))(keys))(lrs)


@jit(cpu_options=CPU_OPTIONS, static_argnames=("tx", "num_steps"))
def _probe(task, tx, num_steps, key):
    """A training loop without evaluation: what a step costs."""
    tx = optax.with_extra_args_support(tx)
    params = task.init(key)
    carry = (params, tx.init(params))
    _, losses = jax.lax.scan(train_step(task, tx), carry, jax.random.split(key, num_steps))
    return losses[-1]


def seconds_per_step(built: Any, tx: Any, steps: int) -> float:
    """Wall-clock seconds per training step of `tx` on `built` (compiled first, then timed)."""
    n = max(1, min(PROBE_STEPS, steps))
    key = jax.random.PRNGKey(0)
    jax.block_until_ready(_probe(built, tx, n, key))
    t0 = time.perf_counter()
    jax.block_until_ready(_probe(built, tx, n, key))
    return (time.perf_counter() - t0) / n


def step_time_ratio(built: Any, tx: Any, steps: int, rounds: int = PROBE_ROUNDS) -> float:
    """`tx`'s time per step over Adam's: the fastest of `rounds` probes of each, alternating.

    Another process on the machine (the benchmark's other worker) only ever adds time to a
    probe, so each loop's fastest probe is the closest to its own cost. The median of three
    per-pair ratios, used before, gave the same 784-input MLP 1.30x on one task and 1.80x
    on another in one run.
    """
    adam = optax.adam(1e-3)  # one instance, so `_probe` compiles Adam's loop once
    times = [
        (seconds_per_step(built, tx, steps), seconds_per_step(built, adam, steps))
        for _ in range(rounds)
    ]
    return min(t for t, _ in times) / min(a for _, a in times)


def _lst(a: Any) -> list:
    a = np.asarray(a, np.float64)
    return [[_num(v) for v in row] for row in a] if a.ndim == 2 else [_num(v) for v in a]


def row_record(runs: dict[str, Any], steps: int, settings: Settings) -> dict[str, Any]:
    """JSON-friendly numbers of one row from `train_seeds`-shaped host arrays.

    Args:
      runs: `evaluate.suite.train`'s dict with a leading seed axis (numpy).
      steps: the horizon.
      settings: the curves' resolution.

    Returns:
      `final` (per metric: mean, std, per seed), `valid_curve` and `train_curve` (mean over
      seeds and per seed), `diverged` and `runs` counts.
    """
    final = {}
    for split in ("train", "valid", "test"):
        for metric in _FINAL:
            k = f"final_{split}_{metric}"
            if k in runs:
                v = np.asarray(runs[k], np.float64)
                final[f"{split}_{metric}"] = {
                    "mean": _num(np.mean(v)),
                    "std": _num(np.std(v)),
                    "seeds": _lst(v),
                }
    valid = np.asarray(runs["valid_curve"], np.float64)
    _, train = smooth_bins(np.asarray(runs["train_curve"], np.float64), settings.train_bins)
    div = np.asarray(runs["diverged"], bool)
    return {
        "final": final,
        # NaN propagates into the mean on purpose: a diverged seed never looks good.
        "valid_curve": {"mean": _lst(valid.mean(0)), "seeds": _lst(valid)},
        "train_curve": {"mean": _lst(train.mean(0)), "seeds": _lst(train)},
        "diverged": int(div.sum()),
        "runs": int(div.size),
    }


def _curves_axes(steps: int, settings: Settings) -> dict[str, list[float]]:
    period = eval_every(steps, settings.eval_points)
    train_steps, _ = smooth_bins(np.zeros(steps), settings.train_bins)
    return {"eval_steps": eval_steps(steps, period), "train_steps": train_steps.tolist()}


class _Built:
    """Per-process cache of built tasks (a worker runs several jobs of one task)."""

    def __init__(self):
        self._tasks: dict[BenchTask, tuple[Any, dict, str]] = {}

    def get(self, task: BenchTask, data_dir: str | None) -> tuple[Any, dict, str]:
        if task not in self._tasks:
            from evaluate.bench.suites import build_task  # noqa: PLC0415

            if len(self._tasks) >= 2:  # bound device memory: datasets can be large
                self._tasks.pop(next(iter(self._tasks)))
            built, info = build_task(task, data_dir)
            self._tasks[task] = (built, info, data_fingerprint(built))
        return self._tasks[task]


_BUILT = _Built()


def run_candidate(job: Job, settings: Settings) -> dict[str, Any]:
    """Trains a candidate optimizer on the job's task for every seed.

    Returns:
      The row record (`row_record`) plus `info`, `step_time_ratio`, `seconds` and the
      curves' step axes.
    """
    from evaluate.bench.specs import parse_spec  # noqa: PLC0415

    task = job.task
    built, info, _ = _BUILT.get(task, settings.data_dir)
    tx = parse_spec(job.spec).make(task.steps, steps_per_epoch(built))
    t0 = time.perf_counter()
    runs = train_seeds(
        built,
        tx,
        task.steps,
        seed_keys(task.name, settings.seeds),
        eval_every(task.steps, settings.eval_points),
    )
    runs = jax.device_get(runs)
    seconds = time.perf_counter() - t0
    rec = row_record(runs, task.steps, settings)
    rec.update(
        info=info,
        seconds=seconds,
        step_time_ratio=_num(step_time_ratio(built, tx, task.steps)),
        **_curves_axes(task.steps, settings),
    )
    return rec


def run_baseline(job: Job, settings: Settings) -> dict[str, Any]:
    """Tunes a baseline's learning rate on the job's task (grid x seeds in one call).

    Returns:
      `baseline` (grid, scores, chosen rate, edge and divergence flags, seconds), `rows`
      (the tuned row; for Adam also the fresh-seed noise reference), `info`, curve axes.
    """
    task, base = job.task, job.baseline
    built, info, _ = _BUILT.get(task, settings.data_dir)
    period = eval_every(task.steps, settings.eval_points)
    keys = seed_keys(task.name, settings.seeds)
    t0 = time.perf_counter()
    grid = _grid(built, base, base.lrs, task.steps, keys, period)
    best, scores = select_lr(grid["final_valid_loss"], grid["diverged"])
    grid, best, scores = jax.device_get((grid, best, scores))
    best = int(best)
    chosen = jax.tree.map(lambda x: x[best], grid)
    rows = {base.name: row_record(chosen, task.steps, settings)}
    lr = float(base.lrs[best])
    if base.name == "adam":
        fresh = _grid(
            built, base, (lr,), task.steps, seed_keys(task.name, settings.seeds, True), period
        )
        rows[FRESH] = row_record(
            jax.tree.map(lambda x: x[0], jax.device_get(fresh)), task.steps, settings
        )
        rows[base.name]["step_time_ratio"] = 1.0
        rows[FRESH]["step_time_ratio"] = 1.0
    else:
        tx = base.transform(lr, task.steps)
        rows[base.name]["step_time_ratio"] = _num(step_time_ratio(built, tx, task.steps))
    seconds = time.perf_counter() - t0
    scores = [_num(s) for s in np.asarray(scores)]
    return {
        "baseline": {
            "lrs": list(base.lrs),
            "scores": scores,
            "lr": lr,
            "lr_index": best,
            # A winner at the grid's end means the optimum may lie outside the grid.
            "at_grid_edge": len(base.lrs) > 1 and best in (0, len(base.lrs) - 1),
            "all_diverged": all(s is None for s in scores),
            "seconds": seconds,
        },
        "rows": rows,
        "info": info,
        **_curves_axes(task.steps, settings),
    }


def run_job(job: Job, settings: Settings) -> dict[str, Any]:
    """Runs one job and writes its result to `job.path` (atomically, with `job.key`).

    Returns:
      The result as written.
    """
    result = run_baseline(job, settings) if job.baseline else run_candidate(job, settings)
    result["key"] = job.key
    write_json_atomic(Path(job.path), result)
    return result


def baseline_job(task: BenchTask, base: Baseline, settings: Settings, cache_dir: str) -> Job:
    """The job of a baseline on a task; its path is in the cache, keyed by its inputs.

    The data fingerprint needs the data, so this builds the task (in this process).
    """
    _, _, fingerprint = _BUILT.get(task, settings.data_dir)
    key = cache_key(
        task.to_json(), base, settings.seeds, settings.eval_points, settings.train_bins, fingerprint
    )
    return Job(
        task, base.name, None, base, str(cache_path(cache_dir, task.name, base.name, key)), key
    )


def cached(job: Job) -> dict[str, Any] | None:
    """The job's finished result if it is on disk with the right key."""
    return read_cache(Path(job.path), job.key)


# ------------------------------------------------------------------------------- workers


def _die_with_parent() -> None:
    """Asks Linux to end this worker when the benchmark process dies (even by SIGKILL), so
    no orphan keeps computing; a no-op elsewhere."""
    try:
        import ctypes  # noqa: PLC0415
        import signal  # noqa: PLC0415

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# A worker retires after this many jobs and a fresh one takes its core: XLA:CPU maps every
# compiled program's code into the process, and one worker that ran ~30 jobs of 7 optimizers
# hit the kernel's map-count limit ("LLVM compilation error: Cannot allocate memory").
# LOPT_BENCH_JOBS_PER_WORKER overrides it (the tests retire workers after 2 jobs).
JOBS_PER_WORKER = 12


def _worker(core: int | None, settings: Settings, jobs: Any, results: Any) -> None:
    """A worker process: pins itself to `core`, then runs jobs until it gets None or has run
    `JOBS_PER_WORKER` of them. It reports on its own pipe `results` (a sending
    `Connection`: each message is written before the next line runs, so what a worker sent
    before dying is never lost): ("start", index) before each job, ("done", index, status,
    detail) after it, ("retire",) when it leaves early."""
    _die_with_parent()
    if core is not None:
        # Before JAX starts: XLA sizes its thread pools from the affinity mask.
        os.sched_setaffinity(0, {core})
    for _ in range(int(os.environ.get("LOPT_BENCH_JOBS_PER_WORKER", JOBS_PER_WORKER))):
        item = jobs.get()
        if item is None:
            return
        index, job = item
        results.send(("start", index))
        t0 = time.perf_counter()
        try:
            run_job(job, settings)
            results.send(("done", index, "ok", time.perf_counter() - t0))
        except Exception as e:  # reported per job; the benchmark goes on with the others
            kind = type(e).__name__
            if kind == "DatasetNotFoundError":
                results.send(("done", index, "skipped", str(e)))
            else:
                results.send(("done", index, "error", f"{kind}: {e}\n{traceback.format_exc()}"))
    results.send(("retire",))


def run_jobs(
    jobs: Sequence[Job],
    settings: Settings,
    workers: int,
    on_done: Callable[[int, str, Any], None],
) -> None:
    """Runs `jobs` on `workers` processes pinned one per core (largest jobs first).

    Args:
      jobs: what to run.
      settings: shared settings.
      workers: worker processes (at most the cores this process may use; each gets one).
      on_done: called in this process as `on_done(index, status, detail)` when a job ends;
        status 'ok' (detail: seconds), 'skipped' (detail: why) or 'error' (detail: message).
    """
    if not jobs:
        return
    cores = sorted(os.sched_getaffinity(0))
    workers = max(1, min(workers, len(cores), len(jobs)))
    ctx = mp.get_context("spawn")  # never fork a process that has started XLA
    job_q = ctx.Queue()
    # Longest first: the last jobs to finish are then short ones (less idle time at the end).
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].cost(settings.seeds))
    for i in order:
        job_q.put((i, jobs[i]))
    for _ in range(workers):
        job_q.put(None)
    procs: dict[int, Any] = {}  # slot -> its worker process
    conns: dict[Any, int] = {}  # the receiving end of each worker's pipe -> slot
    running: dict[int, int] = {}  # slot -> index of the job its worker is running

    def start(slot: int) -> None:
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(cores[slot], settings, job_q, send), daemon=True)
        proc.start()
        send.close()  # the worker holds the only sending end: EOF here when it exits
        procs[slot], conns[receive] = proc, slot

    for slot in range(workers):
        start(slot)
    pending = set(range(len(jobs)))
    try:
        while pending and conns:
            for conn in wait_for_messages(list(conns), timeout=5.0):
                slot = conns[conn]
                try:
                    msg = conn.recv()
                except EOFError:  # the worker exited: after None, or it died
                    del conns[conn]
                    procs[slot].join(timeout=10)
                    if slot in running:  # died inside a job (killed for memory, a crash)
                        index = running.pop(slot)
                        pending.discard(index)
                        code = procs[slot].exitcode
                        on_done(index, "error", f"its worker process died (exit code {code})")
                        if pending:  # a fresh worker takes the slot; the others go on
                            start(slot)
                    continue
                if msg[0] == "start":
                    running[slot] = msg[1]
                elif msg[0] == "retire":
                    del conns[conn]
                    procs[slot].join(timeout=10)
                    start(slot)
                else:
                    _, index, status, detail = msg
                    running.pop(slot, None)
                    pending.discard(index)
                    on_done(index, status, detail)
        for i in sorted(pending):  # every worker gone with jobs left (none took them)
            on_done(i, "error", "a worker process died before it could run this job")
    finally:
        for p in procs.values():
            if p.is_alive():
                p.terminate()
        for p in procs.values():
            p.join(timeout=10)
