"""Metrics against hand-computed values: steps to target, targets, spreads, performance profiles, transfer."""

import math

import pytest

from benchmarks import metrics


def test_steps_to_target_first_crossing_and_never():
    steps, losses = [0, 10, 20, 30], [5.0, 2.0, 0.9, 0.5]
    assert metrics.steps_to_target(steps, losses, 1.0) == 20
    assert metrics.steps_to_target(steps, losses, 2.0) == 10  # <= counts
    assert metrics.steps_to_target(steps, losses, 0.1) is None
    assert metrics.steps_to_target([0, 1], [math.nan, 0.2], 0.5) == 1  # NaN never counts


def test_steps_to_target_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same length"):
        metrics.steps_to_target([0, 1], [1.0], 0.5)


def test_target_is_the_worst_reference_seeds_best_loss():
    curves = [[3.0, 1.0, 1.2], [3.0, 0.5, 0.4], [2.0, math.inf]]
    assert metrics.target_from_reference(curves) == 2.0  # the third seed's best is 2.0
    assert metrics.target_from_reference(curves[:2]) == 1.0


def test_spread_and_cost_of_seeds():
    s = metrics.spread([1.0, 3.0, None, math.inf])
    assert (s["median"], s["mean"], s["min"], s["max"], s["n"], s["failed"]) == (2.0, 2.0, 1.0, 3.0, 4, 2)
    assert s["std"] == pytest.approx(math.sqrt(2.0))
    assert metrics.cost_of_seeds([100, 200, None]) == 200  # median of 100, 200, inf
    assert metrics.cost_of_seeds([100, None, None]) == math.inf
    assert metrics.cost_of_seeds([100, 300]) == 200


def test_performance_profile_by_hand():
    # task a: A=10, B=20, C=inf; task b: A=30, B=15, C=15; task c: nobody finishes.
    costs = {"a": {"A": 10, "B": 20, "C": math.inf},
             "b": {"A": 30, "B": 15, "C": 15},
             "c": {"A": math.inf, "B": math.inf, "C": math.inf}}
    ratios = metrics.performance_ratios(costs)
    assert ratios["a"] == {"A": 1.0, "B": 2.0, "C": math.inf}
    assert ratios["b"] == {"A": 2.0, "B": 1.0, "C": 1.0}
    rho = metrics.performance_profile(costs, taus=[1.0, 2.0, 100.0])
    assert rho["A"] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert rho["B"] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert rho["C"] == pytest.approx([1 / 3, 1 / 3, 1 / 3])


def test_continual_metrics_by_hand():
    # R[i][j]: accuracy on task j after training task i (3 tasks), b: untrained accuracy.
    R = [[0.9, 0.2, 0.1],
         [0.6, 0.8, 0.3],
         [0.5, 0.7, 0.9]]
    b = [0.1, 0.1, 0.1]
    assert metrics.average_final(R) == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert metrics.backward_transfer(R) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)  # -0.25: forgetting
    assert metrics.forward_transfer(R, b) == pytest.approx(((0.2 - 0.1) + (0.3 - 0.1)) / 2)
    # lower-is-better metric (bpc): forgetting raises bpc and still shows as a negative BWT
    bpc = [[2.0, 3.0], [2.5, 2.1]]
    assert metrics.backward_transfer(bpc, higher_is_better=False) == pytest.approx(-0.5)
    assert metrics.forward_transfer(bpc, [4.0, 4.0], higher_is_better=False) == pytest.approx(1.0)


def test_continual_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match="T x T"):
        metrics.backward_transfer([[1.0, 2.0]])
    with pytest.raises(ValueError, match="untrained"):
        metrics.forward_transfer([[1.0, 0.0], [1.0, 1.0]], [0.0])
