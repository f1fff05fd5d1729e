"""Meta-training throughput benchmark on the reference configuration.

    python -m evaluate.measure.speed [--cores N] [--outer-steps 40] [--json out.json]
    python -m evaluate.measure.speed --compare [--cores 1,2] [--rounds 3]

Reference configuration: 8×8 grayscale Fashion-MNIST MLP (64-32-10, ReLU, batch 128); the
per-parameter MLP optimizer with two hidden layers of 32 (1,794 meta-parameters); PES with 8
antithetic pairs (16 unrolls), a truncation window of 20 and episodes of 1,000 steps: the
configuration `../shared/reference/learned_optimization/run_baseline.py` runs with google's
learned_optimization. Prints inner steps per second (wall, and per CPU-second counting every
thread), compile time of the first outer step, whether sampling new tasks of equal shapes
recompiled, FLOPs per inner step and the achieved FLOP rate against a large float32 matmul
on the same cores, and peak RSS.

`--compare` runs this benchmark and the reference alternately, each in a fresh process
pinned to the same number of cores, and prints both figures and their ratio per round:
on shared machines absolute figures drift by up to 2x from hour to hour, so only a ratio
measured side by side means anything. It needs the reference's environment, built with
`bash ../shared/reference/learned_optimization/setup.sh` (see `--reference-python`).

Data: Fashion-MNIST resized to 8×8 when it can be found (LOPT_DATA_DIR or
/usr/share/datasets/fashion-mnist); otherwise random 8×8 images of the same shape (speed does
not depend on pixel values; the output says which was used).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from meta_train.build import build_run
from meta_train.config import load_config
from meta_train.devices import use_cpu_cores
from meta_train.learner import outer_step
from tasks.datasets import Dataset, DatasetNotFoundError
from tasks.family import TaskFamily

REFERENCE = [
    "task_family.hidden_sizes=[[32]]",
    "task_family.batch_sizes=[128]",
    "task_family.activations=['relu']",
    "task_family.resolution=8",
    "task_family.grayscale=true",
    "lopt.hidden_size=32",
    "lopt.hidden_layers=2",
    "lopt.momentum_decays=[0.5, 0.9, 0.99, 0.999]",  # the reference's four momenta
    "meta.num_pairs=8",
    "meta.window=20",
    "meta.min_episode_len=1000",
    "meta.max_episode_len=1000",
    "meta.task_groups=1",
]


def _synthetic_8x8(name: str) -> Dataset:
    """Random 8×8 images with Fashion-MNIST's split sizes (speed ignores pixel values)."""
    rng = np.random.default_rng(0)

    def split(n):
        return rng.standard_normal((n, 8, 8, 1)).astype(np.float32), rng.integers(0, 10, n)

    splits = {"train": split(54000), "valid": split(6000), "test": split(10000)}
    return Dataset(name, splits, 10, "synthetic 8x8 (benchmark)")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _matmul_gflops() -> float:
    """FLOP rate of a large float32 matmul on this process's cores: the practical peak."""
    import jax.numpy as jnp  # noqa: PLC0415

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(5):
            r = f(a)
        jax.block_until_ready(r)
        best = min(best, (time.perf_counter() - t0) / 5)
    return 2 * n**3 / best / 1e9


def _flops_per_inner_step(run) -> float:
    """XLA's FLOP count of one inner step (task gradient and optimizer update) of one unroll."""
    problem = run.estimator.problems[0]
    theta = run.lopt.init_meta(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)
    inner = problem.reset(theta, key, jax.numpy.int32(1000))
    cost = jax.jit(problem.step).lower(theta, inner, key).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def conv_formulations(repeats: int = 50) -> list[dict]:
    """Times a ConvNet training step (loss and gradient, batch 128) with `tasks.conv.conv2d`
    (patches + one matmul) and with XLA's convolution, on MNIST- and CIFAR-shaped inputs."""
    import jax.numpy as jnp  # noqa: PLC0415

    from meta_train.jit import jit  # noqa: PLC0415
    from tasks.conv import ConvNet, conv2d, xla_conv2d  # noqa: PLC0415

    def step_ms(net, x) -> float:
        params = net.init(jax.random.PRNGKey(1), x)

        def loss(p):
            return -jnp.mean(jax.nn.log_softmax(net.apply(p, x))[:, 0])

        step = jit(jax.grad(loss))
        jax.block_until_ready(step(params))
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = step(params)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / repeats * 1e3

    rows = []
    for shape in ((128, 28, 28, 1), (128, 32, 32, 3)):
        x = jax.random.normal(jax.random.PRNGKey(0), shape)
        ms = {
            name: step_ms(ConvNet((16, 32), (3, 3), (2, 2), 10, conv=fn), x)
            for name, fn in (("im2col", conv2d), ("xla", xla_conv2d))
        }
        rows.append(
            {
                "input": "x".join(map(str, shape)),
                "im2col_ms": round(ms["im2col"], 2),
                "xla_conv_ms": round(ms["xla"], 2),
                "speedup": round(ms["xla"] / ms["im2col"], 1),
            }
        )
    return rows


def task_kinds(steps: int = 100, repeats: int = 3) -> list[dict]:
    """Inner steps per second of each task kind at a stated reference size, with the
    learned optimizer (untrained, the default per-parameter MLP) and with Adam.

    One inner step is the task's loss gradient on a sampled batch plus the optimizer update,
    run as a jitted `lax.scan` of `steps` steps (one unroll, no estimator). Tasks are built
    by the same functions as the task families' (`mlp_task`, `conv_task`, `lm_task`). Images
    are random (speed does not depend on pixel values); text is the offline `pydoc` corpus.
    Both optimizers' loops are compiled with `lopt.compiler_options()`.
    """
    import optax  # noqa: PLC0415

    from lopt.export import as_optax  # noqa: PLC0415
    from lopt.mlp_lopt import MLPLOpt  # noqa: PLC0415
    from lopt.xla_options import CPU_OPTIONS  # noqa: PLC0415
    from meta_train.jit import jit  # noqa: PLC0415
    from tasks.classification import mlp_task  # noqa: PLC0415
    from tasks.conv import conv_task  # noqa: PLC0415
    from tasks.device_data import to_device  # noqa: PLC0415
    from tasks.language import lm_task  # noqa: PLC0415
    from tasks.text import load_text  # noqa: PLC0415

    rng = np.random.default_rng(0)

    def images(shape):
        def split(n):
            return rng.standard_normal((n, *shape)).astype(np.float32), rng.integers(0, 10, n)

        return to_device([{"train": split(2048), "valid": split(256), "test": split(256)}])

    text = load_text("pydoc")
    kinds = [
        ("MLP 784-128-128-10, batch 128", mlp_task(images((28, 28, 1)), [128, 128], 10)),
        (
            "ConvNet 16-32 (3x3, stride 2), 28x28x1, batch 128",
            conv_task(images((28, 28, 1)), (16, 32), (3, 3), (2, 2), 10, batch_size=128),
        ),
        ("LSTM LM 128 hidden, seq 64, batch 32", lm_task(text, "lstm", hidden=128)),
        (
            "Transformer LM 2x128, seq 64, batch 32",
            lm_task(text, "transformer", hidden=128, layers=2),
        ),
    ]
    lopt = MLPLOpt()
    learned = as_optax(lopt, lopt.init_meta(jax.random.PRNGKey(0)), steps)
    adam = optax.adam(1e-3)

    def rate(task, tx) -> float:
        # Compiled as `lopt.compiler_options()` advises a user's training step to be.
        @jit(cpu_options=CPU_OPTIONS)
        def run(task, key):
            params = task.init(key)

            def body(carry, k):
                p, s = carry
                loss, g = jax.value_and_grad(task.loss)(p, task.sample_batch(k))
                u, s = tx.update(g, s, p, loss=loss)
                return (optax.apply_updates(p, u), s), loss

            _, losses = jax.lax.scan(body, (params, tx.init(params)), jax.random.split(key, steps))
            return losses

        jax.block_until_ready(run(task, jax.random.PRNGKey(0)))
        best = float("inf")
        for r in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(run(task, jax.random.PRNGKey(r + 1)))
            best = min(best, time.perf_counter() - t0)
        return steps / best

    rows = []
    for name, task in kinds:
        n_params = sum(
            x.size for x in jax.tree.leaves(jax.eval_shape(task.init, jax.random.PRNGKey(0)))
        )
        r_learned, r_adam = rate(task, learned), rate(task, adam)
        rows.append(
            {
                "kind": name,
                "parameters": int(n_params),
                "learned_steps_per_s": round(r_learned, 1),
                "adam_steps_per_s": round(r_adam, 1),
                "learned_step_cost_vs_adam": round(r_adam / r_learned, 2),
            }
        )
    return rows


REFERENCE_SCRIPT = (
    Path(__file__).resolve().parents[3] / "shared/reference/learned_optimization/run_baseline.py"
)
REFERENCE_PYTHON = Path(os.environ.get("TMPDIR", "/tmp")) / "lo-reference-venv/bin/python"


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def compare(
    cores: list[int], rounds: int, outer_steps: int, ref_python: str, ref_script: str
) -> list[dict]:
    """Runs this benchmark and the reference alternately in fresh pinned processes.

    Args:
      cores: core counts to measure at (each is a separate block of rounds).
      rounds: alternations per core count.
      outer_steps: timed outer steps of each run.
      ref_python: the reference environment's Python.
      ref_script: the reference's `run_baseline.py`.

    Returns:
      One record per round: cores, both figures, their ratios.
    """
    rows = []
    for c in cores:
        for r in range(rounds):
            with tempfile.TemporaryDirectory() as tmp:
                out_json = os.path.join(tmp, "ours.json")
                ref = subprocess.run(
                    [ref_python, ref_script, "--cores", str(c), "--outer-steps", str(outer_steps)],
                    capture_output=True,
                    text=True,
                )
                if ref.returncode != 0:
                    raise RuntimeError(f"the reference failed:\n{ref.stderr[-3000:]}")
                ref_out = _last_json(ref.stdout)
                ours = subprocess.run(
                    [sys.executable, "-m", "evaluate.measure.speed", "--cores", str(c)]
                    + ["--outer-steps", str(outer_steps), "--json", out_json],
                    capture_output=True,
                    text=True,
                )
                if ours.returncode != 0:
                    raise RuntimeError(f"this project's benchmark failed:\n{ours.stderr[-3000:]}")
                with open(out_json) as f:
                    our_out = json.load(f)
            row = {
                "cores": c,
                "round": r + 1,
                "ref_steps_per_cpu_s": ref_out["inner_steps_per_cpu_s"],
                "ours_steps_per_cpu_s": our_out["inner_steps_per_cpu_s"],
                "ratio_cpu": our_out["inner_steps_per_cpu_s"] / ref_out["inner_steps_per_cpu_s"],
                "ref_steps_per_wall_s": ref_out["inner_steps_per_s_wall"],
                "ours_steps_per_wall_s": our_out["inner_steps_per_s_wall"],
                "ratio_wall": our_out["inner_steps_per_s_wall"] / ref_out["inner_steps_per_s_wall"],
                "ref_compile_s": ref_out["compile_s"],
                "ours_compile_s": our_out["compile_s"],
            }
            rows.append(row)
            print(
                f"cores={c} round {r + 1}: steps/CPU-s ref {row['ref_steps_per_cpu_s']:,.0f} "
                f"ours {row['ours_steps_per_cpu_s']:,.0f} ({row['ratio_cpu']:.2f}x); "
                f"steps/wall-s ref {row['ref_steps_per_wall_s']:,.0f} "
                f"ours {row['ours_steps_per_wall_s']:,.0f} ({row['ratio_wall']:.2f}x); "
                f"compile ref {row['ref_compile_s']:.1f} s ours {row['ours_compile_s']:.1f} s",
                flush=True,
            )
    print(format_comparison(rows))
    return rows


def format_comparison(rows: list[dict]) -> str:
    """A markdown table of ranges (min–max over rounds) per core count."""

    def rng(xs, fmt):
        lo, hi = min(xs), max(xs)
        return (
            fmt.format(lo)
            if fmt.format(lo) == fmt.format(hi)
            else f"{fmt.format(lo)}–{fmt.format(hi)}"
        )

    lines = [
        "| cores | rounds | reference steps/CPU-s | this project | ratio (same round) "
        "| reference steps/wall-s | this project | ratio | compile: reference | this project |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted({r["cores"] for r in rows}):
        rs = [r for r in rows if r["cores"] == c]

        def col(k, fmt, rs=rs):
            return rng([r[k] for r in rs], fmt)

        lines.append(
            f"| {c} | {len(rs)} | {col('ref_steps_per_cpu_s', '{:,.0f}')} "
            f"| {col('ours_steps_per_cpu_s', '{:,.0f}')} | {col('ratio_cpu', '{:.2f}')}× "
            f"| {col('ref_steps_per_wall_s', '{:,.0f}')} "
            f"| {col('ours_steps_per_wall_s', '{:,.0f}')} "
            f"| {col('ratio_wall', '{:.2f}')}× | {col('ref_compile_s', '{:.1f}')} s "
            f"| {col('ours_compile_s', '{:.1f}')} s |"
        )
    return "\n".join(lines)


_EXAMPLES = """\
examples:
  %(prog)s --cores 2 --outer-steps 40 --json speed.json
  %(prog)s --compare --compare-cores 1,2 --rounds 3
  %(prog)s --kinds
"""


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Runs the throughput benchmark (or `--compare`, `--kinds`, `--conv`) and prints it.

    Args:
      argv: the command line's arguments (default: `sys.argv[1:]`).
      prog: the program's name in usage lines (default: `python -m evaluate.measure.speed`).

    Returns:
      The figures printed (as also written to `--json`).
    """
    p = argparse.ArgumentParser(
        prog=prog or "python -m evaluate.measure.speed",
        description=__doc__.split("\n")[0],
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--outer-steps", type=int, default=40, help="timed outer steps")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.add_argument(
        "--cores",
        type=int,
        default=0,
        help="pin the process to this many CPU cores before XLA starts (0: all)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="run this benchmark and google's learned_optimization alternately at equal cores",
    )
    p.add_argument("--rounds", type=int, default=3, help="--compare: alternations per core count")
    p.add_argument("--compare-cores", default="1,2", help="--compare: comma-separated core counts")
    p.add_argument(
        "--reference-python",
        default=os.environ.get("LOPT_REFERENCE_PYTHON", str(REFERENCE_PYTHON)),
        help="Python of the reference's environment (setup.sh's VENV/bin/python)",
    )
    p.add_argument("--reference-script", default=str(REFERENCE_SCRIPT))
    p.add_argument(
        "--kinds",
        action="store_true",
        help="inner steps per second per task kind, learned optimizer vs Adam",
    )
    p.add_argument(
        "--conv",
        action="store_true",
        help="time a ConvNet step with the im2col convolution and with XLA's convolution",
    )
    p.add_argument("overrides", nargs="*", help="extra config overrides section.key=value")
    args = p.parse_args(argv)
    if args.compare:
        missing = [
            x for x in (args.reference_python, args.reference_script) if not Path(x).exists()
        ]
        if missing:
            print(
                f"error: the reference is not available ({', '.join(missing)} missing). Build it "
                "with `bash ../shared/reference/learned_optimization/setup.sh VENV` and pass "
                "--reference-python VENV/bin/python (or set LOPT_REFERENCE_PYTHON).",
                file=sys.stderr,
            )
            raise SystemExit(2)
        cores = [int(c) for c in args.compare_cores.split(",")]
        rows = compare(
            cores, args.rounds, args.outer_steps, args.reference_python, args.reference_script
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        return {"rounds": rows}
    if args.cores:
        # XLA sizes its CPU thread pools from the affinity mask when its client starts (at
        # the first computation), so pinning here takes effect.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    use_cpu_cores()  # as the main job: one CPU device per core, pairs sharded
    if args.kinds:
        rows = task_kinds()
        print("| task kind | parameters | learned opt. steps/s | Adam steps/s | cost vs Adam |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['kind']} | {r['parameters']:,} | {r['learned_steps_per_s']:,} "
                f"| {r['adam_steps_per_s']:,} | {r['learned_step_cost_vs_adam']}x |"
            )
        return {"kinds": rows}
    if args.conv:
        rows = conv_formulations()
        for r in rows:
            print(
                f"ConvNet 16-32 (3x3, stride 2) step on {r['input']}: im2col {r['im2col_ms']} ms, "
                f"XLA conv {r['xla_conv_ms']} ms ({r['speedup']}x)"
            )
        return {"conv": rows}

    config = load_config(
        None, REFERENCE + [f"task_family.datasets=['{args.dataset}']"] + args.overrides
    )
    try:
        family = TaskFamily(config.task_family)
        data_note = f"{args.dataset} resized to 8x8"
    except DatasetNotFoundError:
        family = TaskFamily(config.task_family, [_synthetic_8x8(args.dataset)])
        data_note = f"random 8x8 images ({args.dataset} not found)"
    run = build_run(config, family)
    m = config.meta
    inner_per_outer = m.inner_steps_per_outer_step
    state = run.init_state()
    n_params = sum(x.size for x in jax.tree.leaves(state.theta))

    t0 = time.perf_counter()
    state, metrics = outer_step(run.estimator, state, run.outer_opt)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    cache0 = outer_step._cache_size()

    # Timed steps: tasks are re-sampled inside (traced numbers) at every episode reset.
    c0, w0 = _cpu(), time.perf_counter()
    for _ in range(args.outer_steps):
        state, metrics = outer_step(run.estimator, state, run.outer_opt)
    jax.block_until_ready(metrics)
    wall, cpu = time.perf_counter() - w0, _cpu() - c0
    steps = args.outer_steps * inner_per_outer

    # A whole new set of sampled tasks of the same shapes (new seed, new particles).
    other = build_run(
        load_config(
            None,
            [f"run.seed={config.run.seed + 1}"]
            + REFERENCE
            + [f"task_family.datasets=['{args.dataset}']"]
            + args.overrides,
        ),
        family,
    )
    s2 = other.init_state()
    s2, mm = outer_step(other.estimator, s2, other.outer_opt)
    jax.block_until_ready(mm)
    recompiled = outer_step._cache_size() != cache0

    flops = _flops_per_inner_step(run)
    peak = _matmul_gflops()
    achieved = flops * steps / wall / 1e9
    out = {
        "data": data_note,
        "meta_parameters": int(n_params),
        "unrolls": 2 * m.num_pairs,
        "window": m.window,
        "compile_s": round(compile_s, 2),
        "inner_steps_per_s_wall": round(steps / wall, 1),
        "inner_steps_per_cpu_s": round(steps / cpu, 1),
        "recompiled_for_new_tasks": bool(recompiled),
        "flops_per_inner_step": int(flops),
        "achieved_gflops": round(achieved, 1),
        "matmul_peak_gflops": round(peak, 1),
        "fraction_of_matmul_peak": round(achieved / peak, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "devices": [str(d) for d in jax.devices()],
        "cpu_cores": len(os.sched_getaffinity(0)),
    }
    for k, v in out.items():
        print(f"{k:>28}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    from meta_train.cli import run_tool

    sys.exit(run_tool(main))
