"""The gate's statistics: bounds checked against independent computations, the verdict rule,
and the images-needed figure. The rates it guarantees are the benchmark's
(benchmarks/bench_gate_statistics.py), which simulates thousands of evaluation sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from pipeline.core.confidence import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    Counts,
    disagreement_bounds,
    drop_bounds,
    images_needed,
    judge,
)


@pytest.mark.parametrize("k, n", [(0, 153), (2, 153), (4, 400), (37, 1000), (400, 400)])
def test_disagreement_bounds_are_scipys_exact_interval_one_sided(k, n):
    """Each one-sided 95% bound is an end of the two-sided 90% Clopper-Pearson interval."""
    interval = binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact")
    assert disagreement_bounds(k, n) == pytest.approx((interval.low, interval.high), abs=1e-12)


def test_zero_of_n_needs_the_textbook_sample_size():
    """0 disagreements show a rate <= 1% at 95% when 0.99^n <= 0.05: n >= 299."""
    assert math.ceil(math.log(0.05) / math.log(0.99)) == 299
    assert images_needed(Counts(153, 0), 0.01, 1.0) == 299
    assert disagreement_bounds(0, 299)[1] <= 0.01 < disagreement_bounds(0, 298)[1]


def test_drop_bounds_hold_the_observed_drop_and_are_symmetric_for_symmetric_counts():
    counts = Counts(400, 8, a=360, b=4, c=4, d=32)
    low, high = drop_bounds(counts)
    assert low < 0 < high and low == pytest.approx(-high)
    worse = Counts(400, 8, a=356, b=8, c=0, d=36)
    low, high = drop_bounds(worse)
    assert low < 8 / 400 < high and low > 0  # 8 lost, none won: shown to drop


def test_drop_bounds_cover_the_true_drop_95_percent_of_the_time():
    """Coverage of each one-sided bound, by simulation at a true drop of 1 point."""
    rng = np.random.default_rng(1)
    cells = [0.89, 0.012, 0.002, 0.096]  # a, b, c, d: drop = 1.0 point
    above = below = 0
    trials = 2000
    for a, b, c, d in rng.multinomial(400, cells, size=trials):
        low, high = drop_bounds(Counts(400, int(b + c), int(a), int(b), int(c), int(d)))
        above += high < 0.01
        below += low > 0.01
    assert above / trials <= 0.06 and below / trials <= 0.06


@pytest.mark.parametrize("counts, verdict", [
    (Counts(400, 0, 380, 0, 0, 20), PASS),  # 0 of 400: upper bound 0.75% <= 1%
    (Counts(153, 0, 140, 0, 0, 13), INCONCLUSIVE),  # 0 of 153: could be 1.9%
    (Counts(400, 20, 360, 20, 0, 20), FAIL),  # 5% disagree, 5 points lost: shown worse
    (Counts(2000, 2, 1800, 1, 1, 198), PASS),
    (Counts(400, 4, 376, 2, 2, 20), INCONCLUSIVE),  # exactly on the 1% limit
])
def test_the_three_verdicts(counts, verdict):
    judgement = judge(counts, min_agreement=0.99, max_drop_points=1.0)
    assert judgement.verdict == verdict, judgement.why


def test_inconclusive_says_how_many_images_would_decide_it():
    judgement = judge(Counts(153, 0), min_agreement=0.99, max_drop_points=1.0)
    assert judgement.images_needed == 299
    assert judgement.why.startswith("inconclusive: 0 of 153 disagree: at least 299 images are "
                                    "needed to show agreement >= 99%")
    on_the_limit = judge(Counts(400, 4), min_agreement=0.99, max_drop_points=1.0)
    assert on_the_limit.images_needed is None and "no number of images" in on_the_limit.why
    # the figure is right: those rates on that many images decide it, on one fewer they do not
    counts = Counts(200, 1)
    needed = images_needed(counts, 0.01, 1.0)
    assert judge(counts.scaled(needed), min_agreement=0.99, max_drop_points=1.0).verdict == PASS
    assert judge(counts.scaled(needed - 1), min_agreement=0.99,
                 max_drop_points=1.0).verdict == INCONCLUSIVE


def test_a_zero_limit_is_judged_on_the_counts():
    """No sample can show a rate of exactly 0: --min-agreement 1 means no disagreement seen."""
    assert judge(Counts(50, 0), min_agreement=1.0, max_drop_points=1.0).verdict == PASS
    assert judge(Counts(50, 1), min_agreement=1.0, max_drop_points=1.0).verdict == FAIL
    assert judge(Counts(50, 2, 45, 1, 1, 3), min_agreement=0.0, max_drop_points=0.0).verdict == PASS
    assert judge(Counts(50, 1, 45, 1, 0, 4), min_agreement=0.0, max_drop_points=0.0).verdict == FAIL
