"""Meta-training throughput benchmark on the reference configuration.

    python -m evaluate.speed [--outer-steps 40] [--json out.json]

Reference configuration (issue #2): 8×8 grayscale image MLP with one hidden layer of 32
units, batch 128; the per-parameter MLP optimizer with two hidden layers of 32 (about 1,800
meta-parameters); PES with 8 antithetic pairs (16 unrolls) and a truncation window of 20.
Prints inner steps per second (wall, and per CPU-second counting every unroll), compile
time, whether sampling new tasks of equal shapes recompiled, and peak RSS.

Data: Fashion-MNIST resized to 8×8 when it can be found (LOPT_DATA_DIR or
/usr/share/datasets/fashion-mnist); otherwise random 8×8 images of the same shape (speed does
not depend on pixel values; the output says which was used).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import jax
import numpy as np

from meta_train.build import build_run
from meta_train.config import load_config
from meta_train.learner import outer_step
from tasks.datasets import Dataset, DatasetNotFoundError
from tasks.family import MLPTaskFamily

REFERENCE = [
    "task_family.hidden_sizes=[[32]]",
    "task_family.batch_sizes=[128]",
    "task_family.activations=['relu']",
    "task_family.resolution=8",
    "task_family.grayscale=true",
    "lopt.hidden_size=32",
    "lopt.hidden_layers=2",
    "meta.num_pairs=8",
    "meta.window=20",
    "meta.min_episode_len=200",
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m evaluate.speed", description=__doc__.split("\n")[0])
    p.add_argument("--outer-steps", type=int, default=40, help="timed outer steps")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.add_argument(
        "--cores",
        type=int,
        default=0,
        help="pin the process to this many CPU cores before XLA starts (0: all)",
    )
    p.add_argument("overrides", nargs="*", help="extra config overrides section.key=value")
    args = p.parse_args(argv)
    if args.cores:
        # XLA sizes its CPU thread pools from the affinity mask when its client starts (at
        # the first computation), so pinning here takes effect.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])

    config = load_config(
        None, REFERENCE + [f"task_family.datasets=['{args.dataset}']"] + args.overrides
    )
    try:
        family = MLPTaskFamily(config.task_family)
        data_note = f"{args.dataset} resized to 8x8"
    except DatasetNotFoundError:
        family = MLPTaskFamily(config.task_family, [_synthetic_8x8(args.dataset)])
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

    out = {
        "data": data_note,
        "meta_parameters": int(n_params),
        "unrolls": 2 * m.num_pairs,
        "window": m.window,
        "compile_s": round(compile_s, 2),
        "inner_steps_per_s_wall": round(steps / wall, 1),
        "inner_steps_per_cpu_s": round(steps / cpu, 1),
        "recompiled_for_new_tasks": bool(recompiled),
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
    main()
    sys.exit(0)
