"""The learning-rate schedule (orpo_local.train.learning_rate) against numbers worked out by hand.

10 steps (0-based), 2 of linear warm-up, peak 1e-3: steps 0 and 1 are 1/2 and 2/2 of the peak;
after them progress = (step - 2) / 8, so step 4 is 1/4 of the way, step 6 half, step 9 seven eighths.
"""

import pytest

from orpo_local.train import learning_rate

PEAK = 1e-3


def rates(schedule: str, total: int = 10, warmup: int = 2) -> list[float]:
    return [learning_rate(step, total, PEAK, warmup, schedule) for step in range(total)]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warm_up_is_linear_to_the_peak(schedule):
    assert rates(schedule)[:2] == pytest.approx([0.5e-3, 1e-3], rel=1e-12)
    assert rates(schedule, total=10, warmup=4)[:4] == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3], rel=1e-12)


def test_cosine_after_warm_up():
    # peak * (1 + cos(pi * progress)) / 2; cos(pi/8) = 0.9238795, cos(pi/4) = 0.7071068, cos(3pi/8) = 0.3826834
    want = {2: 1e-3, 3: 0.9619398e-3, 4: 0.8535534e-3, 5: 0.6913417e-3, 6: 0.5e-3, 7: 0.3086583e-3,
            8: 0.1464466e-3, 9: 0.03806023e-3}
    got = rates("cosine")
    assert {s: got[s] for s in want} == pytest.approx(want, rel=1e-6)


def test_linear_after_warm_up():
    # peak * (1 - progress): an eighth of the peak less each step
    want = {2: 1e-3, 3: 0.875e-3, 4: 0.75e-3, 5: 0.625e-3, 6: 0.5e-3, 7: 0.375e-3, 8: 0.25e-3, 9: 0.125e-3}
    got = rates("linear")
    assert {s: got[s] for s in want} == pytest.approx(want, rel=1e-12)


def test_constant_after_warm_up():
    assert rates("constant")[2:] == pytest.approx([1e-3] * 8, rel=1e-12)


def test_no_warm_up_starts_at_the_peak_and_a_warm_up_longer_than_the_run_ends_at_it():
    assert rates("linear", total=4, warmup=0) == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3], rel=1e-12)
    assert rates("cosine", total=3, warmup=10) == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3], rel=1e-12)
