"""The gradient-server throughput benchmark: its summary and one real run of it."""

import pytest
from test_meta_train import TINY

from evaluate.measure.server_speed import _cpu_spent, measure, summarise


def _run(way, per_wall_s, wall_s=10.0, cpu=None):
    return {
        "way": way,
        "estimates": 100,
        "per_wall_s": per_wall_s,
        "per_cpu_s": per_wall_s / 2,
        "wall_s": wall_s,
        "cpu_by_process": cpu or {},
    }


def test_ratios_are_taken_within_a_round_and_the_targets_read_from_their_medians():
    rounds = [
        [_run("in_process", 100.0), _run("ray1", 89.0), _run("ray2_sync", 172.0)],
        [_run("in_process", 200.0), _run("ray1", 184.0), _run("ray2_sync", 330.0)],
        [_run("in_process", 100.0), _run("ray1", 91.0), _run("ray2_sync", 171.0)],
    ]
    out = summarise([r for rnd in rounds for r in rnd])
    t = out["targets"]
    # Round 2 ran twice as fast throughout (drift): its ratios still count as 0.92 and 1.65.
    assert t["two_workers_speedup"] == pytest.approx(1.71)
    assert t["two_workers_holds"]
    assert t["one_worker_overhead"] == {"ray1": pytest.approx(0.09)}
    assert t["one_worker_holds"]
    assert "| ray, 2 workers, sync | 100 | 172 | 86 | 1.71× (1.65–1.72) |" in out["table"]
    # Without the in-process reference there is nothing to compare with.
    assert summarise([_run("ray1", 90.0)])["targets"] == {}


def test_cpu_seconds_are_split_by_process_and_role():
    before = {"10 python": 1.0, "11 ray::GradientWo": 5.0, "12 raylet": 0.5}
    after = {"10 python": 1.5, "11 ray::GradientWo": 9.0, "12 raylet": 0.75}
    after["13 ray::GradientWo"] = 2.0  # a worker started in between: all its time counts
    spent = _cpu_spent(before, after)
    assert spent == {"python": 0.5, "ray::GradientWo": 6.0, "raylet": 0.25}
    out = summarise([_run("in_process", 100.0), _run("ray1", 90.0, 8.0, spent)])
    assert "| ray, 1 worker, sync | 0.50 | 6.00 | 0.25 | 8.00 |" in out["cpu_table"]


@pytest.mark.slow  # two fresh processes, one starting Ray (~60 s)
def test_the_benchmark_runs_in_process_and_on_ray_at_equal_work():
    out = measure(
        outer_steps=4, warmup=1, rounds=1, overrides=TINY, ways=["in_process", "ray2_sync"]
    )
    runs = {r["way"]: r for r in out["runs"]}
    assert runs["in_process"]["estimates"] == runs["ray2_sync"]["estimates"] == 4
    assert runs["ray2_sync"]["outer_steps"] == 2  # two estimates per synchronous step
    assert runs["in_process"]["inner_steps"] == runs["ray2_sync"]["inner_steps"] > 0
    roles = runs["ray2_sync"]["cpu_by_process"]
    assert roles.get("ray::GradientWo", 0) > 0 and roles.get("python", 0) > 0
    assert out["targets"]["two_workers_speedup"] > 0
