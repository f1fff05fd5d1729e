"""Gradient-server throughput: in-process against Ray with 1 and 2 workers, equal work.

    python -m evaluate.measure.server_speed [--outer-steps 300] [--warmup 3] [--rounds 3]
                                    [--ways W,...] [--config F] [--json F]
                                    [section.key=value ...]

Meta-trains the same config (default: `configs/default.toml` with fixed templates and no
meta-validation, so nothing but estimates and updates is timed) in several ways, each in a
fresh process of its own session:

- `in_process`: today's fused step, the process pinned to one core (one device): the
  reference;
- `in_process_all`: the same on every core, one JAX device per core and the pairs sharded
  across them (the default job's setting; not in the default `--ways`);
- `ray1`: the gradient server with one Ray worker pinned to a core, synchronous (the
  worker waits for every update and θ's round trip);
- `ray1_queued`: one worker, asynchronous with `queue_depth=2` (its next estimate is queued
  while the learner updates, so it never waits; estimates one version stale);
- `ray2_sync`, `ray2_async`, `ray2_queued`: two workers, each pinned to its own core;
  synchronous, asynchronous (meta-batch 2) and asynchronous with `queue_depth=2`.

Every way computes the same number of estimates (`--outer-steps` of them, so a 2-worker
run takes half as many outer steps, each averaging two), after `--warmup` untimed outer
steps that compile. Reports inner steps per wall-second and per CPU-second (CPU time of
every process of the run's session: learner, workers and Ray's own daemons, also shown
separately), the ratio to the in-process run, and whether the targets hold: 2 pinned
workers ≥ 1.7× the single-core in-process wall throughput, and Ray with 1 worker at most
10 % slower than in-process. Figures drift by up to 2× between hours on shared machines;
compare ratios within one run (`--rounds` alternates the ways; medians are reported).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: children run from there
WAYS = {  # name: (what the table calls it, config overrides)
    "in_process": ("in-process, 1 core", []),
    "in_process_all": ("in-process, every core (a device each)", []),
    "ray1": ("ray, 1 worker, sync", ["server.backend='ray'"]),
    "ray1_queued": (
        "ray, 1 worker, async, 2 queued",
        ["server.backend='ray'", "server.mode='async'", "server.queue_depth=2"],
    ),
    "ray2_sync": ("ray, 2 workers, sync", ["server.backend='ray'", "server.workers=2"]),
    "ray2_async": (
        "ray, 2 workers, async",
        ["server.backend='ray'", "server.workers=2", "server.mode='async'"],
    ),
    "ray2_queued": (
        "ray, 2 workers, async, 2 queued",
        ["server.backend='ray'", "server.workers=2", "server.mode='async'", "server.queue_depth=2"],
    ),
}
DEFAULT_WAYS = "in_process,ray1,ray1_queued,ray2_sync,ray2_queued"
BASE = ["meta.switch_every=0", "valid.every=0", "run.wandb_mode='disabled'"]
TARGET_TWO_WORKERS = 1.7  # × the in-process wall throughput
TARGET_RAY_OVERHEAD = 0.10


def _session_cpu(sid: int) -> dict[str, float]:
    """User + system CPU seconds of the live processes of session `sid`, by 'pid name'."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
        except OSError:
            continue
        name, fields = raw[raw.find("(") + 1 : raw.rfind(")")], raw.rsplit(")", 1)[1].split()
        if len(fields) > 12 and int(fields[3]) == sid:
            out[f"{stat.parent.name} {name}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _cpu_spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per process between two `_session_cpu` readings, by process name
    (processes that ended in between are not counted)."""
    spent: dict[str, float] = {}
    for proc, cpu in after.items():
        name = proc.split(" ", 1)[1]
        spent[name] = spent.get(name, 0.0) + cpu - before.get(proc, 0.0)
    return spent


def _child(way: str, outer_steps: int, warmup: int, config: str, overrides: list[str]) -> dict:
    """Runs one way in this process and returns its figures."""
    fused = way.startswith("in_process")
    if way == "in_process":  # one core, one device: the single-core reference
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from meta_train.devices import use_cpu_cores  # noqa: PLC0415

    use_cpu_cores()
    import jax  # noqa: PLC0415

    from meta_train.build import build_run  # noqa: PLC0415
    from meta_train.config import load_config  # noqa: PLC0415
    from meta_train.server import GradientServer  # noqa: PLC0415

    cfg = load_config(config, [*overrides, *BASE, *WAYS[way][1]])
    run = build_run(cfg)
    per_step = 1 if fused else cfg.server.estimates_per_step
    steps = max(outer_steps // per_step, 1)
    server = None
    try:
        if fused:
            state, step_fn = run.init_state(), run.outer_step
        else:
            server = GradientServer(run)
            state, step_fn = run.init_server_state(), server.step
        for i in range(warmup):
            state, metrics = step_fn(state, i)
        jax.block_until_ready(state.theta)
        sid = os.getsid(0)
        c0, t0 = _session_cpu(sid), time.perf_counter()
        for i in range(warmup, warmup + steps):
            state, metrics = step_fn(state, i)
        jax.block_until_ready(state.theta)
        wall, by_process = time.perf_counter() - t0, _cpu_spent(c0, _session_cpu(sid))
        cpu = sum(by_process.values())
        dropped = float(metrics.get("server/dropped_stale_total", 0.0)) if server else 0.0
    finally:
        if server is not None:
            server.close()
    inner = steps * per_step * cfg.meta.inner_steps_per_outer_step
    return {
        "way": way,
        "outer_steps": steps,
        "estimates": steps * per_step,
        "inner_steps": inner,
        "wall_s": wall,
        "cpu_s": cpu,
        "per_wall_s": inner / wall,
        "per_cpu_s": inner / cpu if cpu > 0 else float("nan"),
        "dropped": dropped,
        "cpu_by_process": by_process,
        "meta_loss": float(metrics["meta_loss"]),
    }


def measure(
    outer_steps: int = 300,
    warmup: int = 3,
    rounds: int = 3,
    config: str = "configs/default.toml",
    overrides: list[str] | None = None,
    ways: list[str] | None = None,
) -> dict:
    """Runs every way `rounds` times, alternating, each in a fresh process and session.

    Returns:
      {'runs': every child's figures, 'table': a markdown table of medians, 'targets': ...}.
    """
    ways = ways or list(WAYS)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", WANDB_MODE="disabled")
    env.pop("JAX_NUM_CPU_DEVICES", None)  # each way picks its own devices
    runs = []
    for _ in range(rounds):
        for way in ways:
            cmd = [
                sys.executable,
                "-m",
                "evaluate.measure.server_speed",
                "--child",
                way,
                "--outer-steps",
                str(outer_steps),
                "--warmup",
                str(warmup),
                "--config",
                config,
                *(overrides or []),
            ]
            out = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, start_new_session=True
            )
            if out.returncode != 0:
                raise RuntimeError(f"{way} failed:\n{out.stderr[-3000:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return summarise(runs)


def _role(process: str) -> str:
    """Which part of a run a process (by name) is: learner, workers or Ray's daemons."""
    if process.startswith("ray::GradientWo"):
        return "workers"
    if process == "python":  # the benchmark's child: the learner (or the fused run)
        return "learner"
    return "ray daemons"


def summarise(runs: list[dict]) -> dict:
    """Medians per way, per-round ratios to the in-process run of the same round, and the
    targets.

    Args:
      runs: every child's figures, in the order they ran (`--rounds` rounds of the ways).

    Returns:
      {'runs', 'table' (markdown), 'cpu_table' (CPU seconds by role, medians), 'targets':
      {'two_workers_speedup', 'two_workers_holds', 'one_worker_overhead': {way: overhead},
      'one_worker_holds'} (the keys whose ways ran)}.
    """
    by_way: dict[str, list[dict]] = {}
    for r in runs:
        by_way.setdefault(r["way"], []).append(r)
    med = {w: statistics.median(r["per_wall_s"] for r in rs) for w, rs in by_way.items()}
    ref_runs = by_way.get("in_process", [])
    # Ratios within a round: run k of a way against run k of the reference.
    ratios = {
        w: [r["per_wall_s"] / ref["per_wall_s"] for r, ref in zip(rs, ref_runs, strict=False)]
        for w, rs in by_way.items()
    }
    lines = [
        "| way | estimates | inner steps / wall-s | inner steps / CPU-s | wall vs in-process "
        "(range over rounds) |",
        "|---|---|---|---|---|",
    ]
    cpu_lines = [
        "| way | learner (in-process: the whole run) | workers | Ray's daemons | wall-s |",
        "|---|---|---|---|---|",
    ]
    for w, rs in by_way.items():
        per_cpu = statistics.median(r["per_cpu_s"] for r in rs)
        rat = ratios[w]
        shown = f"{statistics.median(rat):.2f}× ({min(rat):.2f}–{max(rat):.2f})" if rat else "—"
        lines.append(
            f"| {WAYS[w][0]} | {rs[0]['estimates']} | {med[w]:,.0f} | {per_cpu:,.0f} | {shown} |"
        )
        roles = {"learner": [], "workers": [], "ray daemons": []}
        for r in rs:
            spent = dict.fromkeys(roles, 0.0)
            for proc, secs in r.get("cpu_by_process", {}).items():
                spent[_role(proc)] += secs
            for k, v in spent.items():
                roles[k].append(v)
        wall = statistics.median(r["wall_s"] for r in rs)
        cpu_lines.append(
            f"| {WAYS[w][0]} | "
            + " | ".join(f"{statistics.median(v):.2f}" for v in roles.values())
            + f" | {wall:.2f} |"
        )
    targets: dict = {}
    two = {w: statistics.median(ratios[w]) for w in ratios if w.startswith("ray2") and ratios[w]}
    if two:
        targets["two_workers_speedup"] = max(two.values())
        targets["two_workers_holds"] = max(two.values()) >= TARGET_TWO_WORKERS
    one = {w: 1 - statistics.median(r) for w, r in ratios.items() if w.startswith("ray1") and r}
    if one:
        targets["one_worker_overhead"] = one
        targets["one_worker_holds"] = min(one.values()) <= TARGET_RAY_OVERHEAD
    return {
        "runs": runs,
        "table": "\n".join(lines),
        "cpu_table": "\n".join(cpu_lines),
        "targets": targets,
    }


_EXAMPLES = """\
examples:
  %(prog)s
  %(prog)s --outer-steps 100 --rounds 1 --ways in_process,ray2_queued --json server.json
"""


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Measures every way (or, with `--child`, one way in this process) and prints the tables.

    Args:
      argv: the command line's arguments (default: `sys.argv[1:]`).
      prog: the program's name in usage lines (default: `python -m evaluate.measure.server_speed`).

    Returns:
      The exit status (0; argument errors exit with 2).
    """
    p = argparse.ArgumentParser(
        prog=prog or "python -m evaluate.measure.server_speed",
        description=__doc__.split("\n")[0],
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--outer-steps", type=int, default=300, help="estimates timed per way")
    p.add_argument("--warmup", type=int, default=3, help="untimed outer steps first")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of every way")
    p.add_argument("--config", default="configs/default.toml")
    p.add_argument(
        "--ways",
        default=DEFAULT_WAYS,
        help=f"comma-separated ways to run, of {', '.join(WAYS)}",
    )
    p.add_argument("--json", default=None, help="also write every figure here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides: section.key=value")
    args = p.parse_intermixed_args(argv)
    if args.outer_steps < 1 or args.warmup < 1 or args.rounds < 1:
        p.error("--outer-steps, --warmup and --rounds must be >= 1")
    if args.child:
        result = _child(args.child, args.outer_steps, args.warmup, args.config, args.overrides)
        print(json.dumps(result))
        return 0
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = [w for w in ways if w not in WAYS]
    if unknown:
        p.error(f"unknown ways {unknown}; known: {list(WAYS)}")
    result = measure(args.outer_steps, args.warmup, args.rounds, args.config, args.overrides, ways)
    print(result["table"])
    print("\nCPU seconds of the timed part, by role (medians):\n")
    print(result["cpu_table"])
    t = result["targets"]
    if "two_workers_speedup" in t:
        print(
            f"\n2 pinned workers: {t['two_workers_speedup']:.2f}× the single-core in-process "
            f"wall throughput, best way's median (target ≥ {TARGET_TWO_WORKERS}×: "
            f"{'holds' if t['two_workers_holds'] else 'does NOT hold'})"
        )
    for w, overhead in t.get("one_worker_overhead", {}).items():
        print(
            f"{WAYS[w][0]}: {overhead:+.1%} slower than in-process "
            f"(target ≤ {TARGET_RAY_OVERHEAD:.0%}: "
            f"{'holds' if overhead <= TARGET_RAY_OVERHEAD else 'does NOT hold'})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    from meta_train.cli import run_tool

    sys.exit(run_tool(main))
