"""Assembling benchmark results: divergence counts and per-row summaries across tasks."""

from evaluate.bench.results import _aggregate, count_diverged


def _run(finals, train_starts, valid=(2.3, 1.0)):
    return {
        "final": {"train_loss": {"seeds": list(finals)}},
        "train_curve": {"seeds": [[s, 1.0] for s in train_starts]},
        "valid_curve": {"seeds": [list(valid) for _ in finals]},
        "diverged": 0,
        "runs": len(finals),
    }


def test_a_finite_run_that_ends_above_its_start_counts_as_diverged():
    assert count_diverged(_run([0.5, 0.6, 0.4], [2.3, 2.3, 2.3])) == 0
    assert count_diverged(_run([0.5, 5.1, 0.4], [2.3, 2.3, 2.3])) == 1  # blew up, finite
    assert count_diverged(_run([None, 0.6, 0.4], [2.3, 2.3, 2.3])) == 1  # non-finite
    assert count_diverged(_run([0.5, 0.6], [2.3, 2.3], valid=(2.3, None))) == 2


def _task(speed_up, ref_target=1.0, ratio=2.0):
    su = {"speed_up": speed_up, "target": ref_target}
    adam = {"speed_up": 1.0, "target": ref_target}
    return {
        "runs": {
            "adam": {"speed_up_valid": adam, "speed_up_train": adam, "diverged": 0, "runs": 3},
            "x": {
                "speed_up_valid": su,
                "speed_up_train": su,
                "diverged": 1,
                "runs": 3,
                "step_time_ratio": ratio,
            },
        }
    }


def test_aggregate_skips_tasks_without_a_reference_point_and_counts_never():
    tasks = [_task(2.0), _task(None), _task(0.5), _task(3.0, ref_target=None)]
    agg = _aggregate(tasks, "x")
    assert agg["valid"]["tasks"] == 3 and agg["valid"]["never"] == 1
    assert agg["valid"]["median"] == 0.5 and agg["valid"]["win_rate"] == 1 / 3
    assert agg["diverged"] == 4 and agg["runs"] == 12  # divergence counts on every task
    assert agg["step_time_ratio_median"] == 2.0
    # wall time: each speed-up over its step time (2.0 here); never stays never
    assert agg["wall_valid"]["tasks"] == 3 and agg["wall_valid"]["never"] == 1
    assert agg["wall_valid"]["median"] == 0.25 and agg["wall_valid"]["win_rate"] == 1 / 3
