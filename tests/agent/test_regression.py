"""The trial's latency verdict (agent/regression.py): significant and large, or nothing."""

from __future__ import annotations

import random

import pytest

from agent.regression import compare, mann_whitney_greater, thin

pytestmark = pytest.mark.unit


def test_mann_whitney_is_small_only_when_the_first_sample_is_larger() -> None:
    low, high = [float(i) for i in range(1, 31)], [float(i) for i in range(31, 61)]
    assert mann_whitney_greater(high, low) < 1e-9
    assert mann_whitney_greater(low, high) > 0.999
    same = [1.0] * 30  # all tied: no variance, no evidence of anything
    assert mann_whitney_greater(same, same) == 1.0


def test_a_same_speed_model_under_bursty_load_is_not_a_regression() -> None:
    """Paired passes see the same preemption: heavy tails on both sides cancel out."""
    rng = random.Random(1)
    new, old = [], []
    for _ in range(3000):
        burst = rng.random() < 0.05  # a busy core: both passes of the pair are slowed
        scale = rng.uniform(5, 20) if burst else 1.0
        new.append(0.0005 * scale * rng.uniform(0.95, 1.05))
        old.append(0.0005 * scale * rng.uniform(0.95, 1.05))
    verdict = compare(new, old, 25, 50)
    assert verdict.problems == ()
    assert abs(verdict.p50_rise_pct) < 5


def test_a_slower_model_is_caught_on_the_median_and_reported_in_numbers() -> None:
    rng = random.Random(2)
    old = [0.0005 * rng.uniform(0.9, 1.1) for _ in range(500)]
    new = [0.0015 * rng.uniform(0.9, 1.1) for _ in range(500)]
    verdict = compare(new, old, 25, 50)
    assert verdict.p_value < 1e-6 and verdict.p50_rise_pct > 150
    assert verdict.problems[0].startswith("median latency 1.5")
    assert "Mann-Whitney" in verdict.summary()


def test_a_small_significant_shift_below_the_limit_is_not_a_regression() -> None:
    rng = random.Random(3)
    old = [0.001 * rng.uniform(0.98, 1.02) for _ in range(4000)]
    new = [0.00105 * rng.uniform(0.98, 1.02) for _ in range(4000)]
    verdict = compare(new, old, 25, 50)
    assert verdict.p_value < 0.01 and verdict.problems == ()


def test_thin_keeps_at_most_the_limit_evenly() -> None:
    assert thin(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert thin([1.0, 2.0], 5) == [1.0, 2.0]
    with pytest.raises(ValueError):
        compare([], [0.001], 25, 50)
