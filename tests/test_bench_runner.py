"""`evaluate.bench.runner`'s step-time probe: alternating rounds, each loop compiled once,
the fastest probe of each."""

import math

import optax
import pytest

from evaluate.bench import runner
from evaluate.bench.runner import _probe, step_time_ratio
from evaluate.bench.suites import BenchTask, build_task


def test_the_step_time_ratio_alternates_rounds_and_compiles_each_loop_once():
    task = BenchTask(
        "mlp-mnist1d@20",
        "mlp",
        20,
        (("batch_size", 32), ("dataset", "mnist1d"), ("hidden_sizes", [8])),
    )
    built, _ = build_task(task)
    before = _probe._cache_size()
    ratio = step_time_ratio(built, optax.sgd(0.1), task.steps, rounds=3)
    assert math.isfinite(ratio) and ratio > 0
    # Three rounds of two probes, two programs: SGD's loop and Adam's (one instance).
    assert _probe._cache_size() == before + 2


def test_the_ratio_is_of_each_loops_fastest_probe(monkeypatch):
    # A probe slowed by another process must not set the ratio: with scripted timings
    # (learned, Adam alternating), the ratio is min(learned) / min(Adam).
    times = iter([3.0, 1.0, 2.0, 5.0, 9.0, 1.5])
    monkeypatch.setattr(runner, "seconds_per_step", lambda *a: next(times))
    assert step_time_ratio(None, None, 10, rounds=3) == pytest.approx(2.0 / 1.0)
