"""The statistics of ``bnas-nni study`` against values worked out by hand on fixed numbers."""
import math

import numpy as np
import pytest

from bnas_nni.study import stats


def test_mean_and_sample_std():
    assert stats.mean([1, 2, 3, 4]) == 2.5
    # squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, over n - 1 = 3
    assert stats.std([1, 2, 3, 4]) == pytest.approx(math.sqrt(5 / 3), abs=1e-12)
    assert math.isnan(stats.std([7.0])) and math.isnan(stats.mean([]))


def test_bootstrap_interval_on_two_values_is_their_range():
    # resampled means of [0, 10] are 0 (p 1/4), 5 (1/2), 10 (1/4): the 2.5 % and 97.5 % quantiles are 0 and 10
    assert stats.bootstrap_ci([0, 10], samples=4000, seed=0) == (0.0, 10.0)
    assert stats.bootstrap_ci([5, 5, 5]) == (5.0, 5.0)
    assert stats.bootstrap_ci([3.0]) == (3.0, 3.0)


def test_bootstrap_interval_is_repeatable_and_brackets_the_mean():
    xs = [71.2, 70.4, 72.9, 69.8, 71.7, 70.9]
    lo, hi = stats.bootstrap_ci(xs, samples=5000, seed=3)
    assert (lo, hi) == stats.bootstrap_ci(xs, samples=5000, seed=3)
    assert lo < np.mean(xs) < hi and min(xs) < lo and hi < max(xs)
    # normal approximation of the percentile interval: mean +- 1.96 * std / sqrt(n) * sqrt((n-1)/n)
    half = 1.96 * np.std(xs) / math.sqrt(len(xs))
    assert hi - lo == pytest.approx(2 * half, rel=0.25)


def test_welch_t_test_by_hand():
    a, b = [1, 2, 3, 4], [2, 4, 6, 8]
    # means 2.5 and 5; variances 5/3 and 20/3; se^2 = 5/12 + 20/12 = 25/12; t = -2.5 / sqrt(25/12) = -sqrt(3)
    t, p = stats.welch_t_test(a, b)
    assert t == pytest.approx(-math.sqrt(3), abs=1e-12)
    # Welch-Satterthwaite df = (25/12)^2 / ((5/12)^2/3 + (20/12)^2/3) = 75/17; two-sided p of t(75/17) at sqrt(3)
    df = 75 / 17
    grid = np.linspace(math.sqrt(3), 400, 2_000_001)
    dens = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) \
        * (1 + grid ** 2 / df) ** (-(df + 1) / 2)
    assert p == pytest.approx(2 * np.trapezoid(dens, grid), abs=1e-4)
    assert 0.14 < p < 0.16
    assert all(math.isnan(v) for v in stats.welch_t_test([1.0], [2.0, 3.0]))


def test_permutation_test_by_hand():
    # [0, 0] vs [1, 1]: of the 6 ways to split {0, 0, 1, 1} in two pairs, 2 reach |difference| 1 -> p = 1/3
    p = stats.permutation_test([0, 0], [1, 1], samples=20000, seed=0)
    assert p == pytest.approx(1 / 3, abs=0.015)
    assert p == stats.permutation_test([0, 0], [1, 1], samples=20000, seed=0)
    assert stats.permutation_test([1, 2, 3], [1, 2, 3], samples=500) == 1.0


def test_kendall_tau_by_hand():
    # (1,1) (2,3) (3,2) (4,4): 5 concordant pairs, 1 discordant of 6 -> tau = 4/6
    tau, p = stats.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4])
    assert tau == pytest.approx(2 / 3, abs=1e-12)
    # exact null distribution for n = 4: the 24 orders have 0..6 discordant pairs 1, 3, 5, 6, 5, 3, 1 times, so
    # 4 reach tau >= 2/3 (at most one discordant pair) and 4 tau <= -2/3 -> two-sided p = 8/24
    assert p == pytest.approx(8 / 24, abs=1e-9)
    assert stats.kendall_tau([1, 2, 3], [3, 2, 1])[0] == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        stats.kendall_tau([1, 2], [1, 2, 3])


def test_pareto_front():
    # (cost, acc): (1, 50) (2, 40) (3, 60) (4, 55) (3, 58): kept are the cheapest, then each more accurate one
    assert stats.pareto_front([1, 2, 3, 4, 3], [50, 40, 60, 55, 58]) == [0, 2]
    assert stats.pareto_front([2, 1], [70, 70]) == [1]
