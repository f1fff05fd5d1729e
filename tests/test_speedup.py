"""The speed-up metric on hand-made curves, and its summaries across tasks."""

import math

import numpy as np
import pytest

from evaluate.bench.speedup import (
    aggregate,
    coarsen,
    interquartile_mean,
    reference_point,
    smooth_bins,
    speed_up,
    steps_to_reach,
)

STEPS = [0, 10, 20, 30, 40]
ADAM = [2.0, 1.5, 1.2, 1.0, 1.1]  # best 1.0 at step 30, then overfits


def test_identical_curves_give_exactly_one():
    r = speed_up(STEPS, ADAM, ADAM)
    assert r["speed_up"] == 1.0
    assert r["reference_steps"] == 30.0 and r["candidate_steps"] == 30.0 and r["target"] == 1.0


def test_reaching_earlier_is_a_speed_up_above_one():
    r = speed_up(STEPS, ADAM, [2.0, 1.0, 0.9, 0.8, 0.7])  # 1.0 exactly at step 10
    assert r["speed_up"] == pytest.approx(3.0)


def test_crossing_between_records_is_interpolated():
    # 1.2 at step 10, 0.8 at step 20: crosses 1.0 half-way, at step 15.
    r = speed_up(STEPS, ADAM, [2.0, 1.2, 0.8, 0.8, 0.8])
    assert r["candidate_steps"] == pytest.approx(15.0)
    assert r["speed_up"] == pytest.approx(30.0 / 15.0)


def test_reaching_later_is_below_one():
    r = speed_up(STEPS, ADAM, [2.0, 1.8, 1.6, 1.4, 1.0])
    assert r["speed_up"] == pytest.approx(30.0 / 40.0)


def test_never_reaching_is_none_not_a_number():
    r = speed_up(STEPS, ADAM, [2.0, 1.9, 1.8, 1.7, 1.01])
    assert r["speed_up"] is None and r["candidate_steps"] is None and r["target"] == 1.0


def test_a_diverged_candidate_never_reaches_and_nan_is_not_a_crossing():
    r = speed_up(STEPS, ADAM, [2.0, 1.5, math.nan, math.nan, math.nan])
    assert r["speed_up"] is None
    # NaN before the crossing: the crossing step itself is used, not a NaN interpolation.
    assert steps_to_reach(STEPS, [2.0, math.nan, 0.5, 0.5, 0.5], 1.0) == 20.0


def test_a_reference_without_finite_points_gives_no_speed_up():
    assert reference_point(STEPS, [math.nan] * 5) is None
    assert speed_up(STEPS, [math.inf] * 5, ADAM)["target"] is None


def test_mismatched_lengths_fail():
    with pytest.raises(ValueError, match="one length"):
        steps_to_reach([0, 1], [1.0], 0.5)


def test_aggregate_counts_never_as_zero():
    agg = aggregate([2.0, None, 1.0, 0.5])
    assert agg["never"] == 1 and agg["tasks"] == 4
    assert agg["median"] == pytest.approx(0.75)  # of 0, 0.5, 1, 2
    assert agg["win_rate"] == pytest.approx(0.5)  # 2.0 and 1.0
    assert agg["iqm"] == pytest.approx(0.75)  # middle half: 0.5 and 1.0
    empty = aggregate([])
    assert empty["median"] is None and empty["iqm"] is None and empty["win_rate"] is None


def test_interquartile_mean_trims_a_quarter_each_side_with_fractional_ends():
    assert interquartile_mean(list(range(8))) == pytest.approx(3.5)  # mean of 2..5
    # n = 5: middle half spans 1.25 .. 3.75 -> weights 0, .75, 1, .75, 0
    v = [0.0, 1.0, 2.0, 3.0, 100.0]
    assert interquartile_mean(v) == pytest.approx((0.75 * 1 + 2 + 0.75 * 3) / 2.5)
    assert interquartile_mean([]) is None


def test_bins_average_minibatch_losses_and_coarsen_merges_them():
    steps, curve = smooth_bins(np.arange(1.0, 11.0)[None], 5)
    assert steps.tolist() == [2, 4, 6, 8, 10]
    np.testing.assert_allclose(curve, [[1.5, 3.5, 5.5, 7.5, 9.5]])
    s2, c2 = coarsen(steps, curve[0], 2)
    assert s2.tolist() == [4.0, 10.0]  # end step of each merged bin
    np.testing.assert_allclose(c2, [2.5, (5.5 + 7.5 + 9.5) / 3])
