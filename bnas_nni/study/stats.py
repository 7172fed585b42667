"""The statistics of a study: summaries of a set of accuracies and the tests that compare two sets.

Contract: every function takes plain sequences of floats and returns plain floats (or tuples of them),
is deterministic (the bootstrap and the permutation test draw from ``numpy.random.default_rng(seed)``),
and says ``nan`` where a quantity is undefined (the std of one value, a test with fewer than two values
on a side) rather than raising: a study with one seed still gets its table. The standard deviation is
the sample one (``ddof=1``), as tables of seeds report it. Where SciPy is installed the Welch test and
Kendall's tau come from it; the NumPy fallbacks compute the same definitions.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

try:  # SciPy is optional: the fallbacks below compute the same quantities
    from scipy import stats as _scipy_stats
except ImportError:  # pragma: no cover - SciPy is installed here
    _scipy_stats = None

__all__ = ['mean', 'std', 'bootstrap_ci', 'welch_t_test', 'permutation_test', 'kendall_tau', 'pareto_front']

NAN = float('nan')


def _values(xs: Sequence[float]) -> np.ndarray:
    return np.asarray([float(x) for x in xs], dtype=np.float64)


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean; nan for no values."""
    a = _values(xs)
    return float(a.mean()) if a.size else NAN


def std(xs: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1); nan for fewer than two values."""
    a = _values(xs)
    return float(a.std(ddof=1)) if a.size > 1 else NAN


def bootstrap_ci(xs: Sequence[float], *, level: float = 0.95, samples: int = 10000,
                 seed: int = 0) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean: ``samples`` resamples with replacement drawn by
    ``default_rng(seed)`` as one ``integers(0, n, (samples, n))`` matrix, then the ``(1-level)/2`` and
    ``(1+level)/2`` quantiles (linear interpolation) of the resampled means. One value: ``(x, x)``."""
    a = _values(xs)
    if a.size == 0:
        return NAN, NAN
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(int(samples), a.size))
    means = a[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float]:
    """Welch's unequal-variance t-test of mean(a) != mean(b): ``(t, two-sided p)``; nan when a side has
    fewer than two values or both have no spread."""
    x, y = _values(a), _values(b)
    if x.size < 2 or y.size < 2:
        return NAN, NAN
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    if vx + vy == 0:
        return NAN, NAN
    t = (x.mean() - y.mean()) / math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx ** 2 / (x.size - 1) + vy ** 2 / (y.size - 1))
    if _scipy_stats is not None:
        p = 2 * _scipy_stats.t.sf(abs(t), df)
    else:  # pragma: no cover - SciPy is installed here
        p = _t_two_sided_p(abs(t), df)
    return float(t), float(p)


def _t_two_sided_p(t: float, df: float) -> float:  # pragma: no cover - used without SciPy only
    """Two-sided p of Student's t by numerical integration of its density (no SciPy)."""
    grid = np.linspace(t, t + 200.0, 200001)
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    dens = np.exp(logc - (df + 1) / 2 * np.log1p(grid ** 2 / df))
    return float(min(1.0, 2 * np.trapezoid(dens, grid)))


def permutation_test(a: Sequence[float], b: Sequence[float], *, samples: int = 10000, seed: int = 0) -> float:
    """Two-sided permutation p-value of the difference of means: the share of ``samples`` random
    relabellings (``default_rng(seed).permutation``) whose |mean difference| reaches the observed one,
    counted with the observed labelling itself ((k + 1) / (samples + 1))."""
    x, y = _values(a), _values(b)
    if x.size == 0 or y.size == 0:
        return NAN
    pooled = np.concatenate([x, y])
    observed = abs(x.mean() - y.mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(int(samples)):
        p = rng.permutation(pooled)
        if abs(p[:x.size].mean() - p[x.size:].mean()) >= observed - 1e-12:
            hits += 1
    return (hits + 1) / (int(samples) + 1)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> Tuple[float, float]:
    """Kendall's tau-b between two rankings of the same items and its two-sided p-value (SciPy's);
    without SciPy the tau-b with p = nan. nan for fewer than two items."""
    a, b = _values(x), _values(y)
    if a.size != b.size:
        raise ValueError(f'kendall_tau: {a.size} and {b.size} values; the rankings must cover the same items')
    if a.size < 2:
        return NAN, NAN
    if _scipy_stats is not None:
        res = _scipy_stats.kendalltau(a, b)
        return float(res.statistic), float(res.pvalue)
    concordant = discordant = ties_a = ties_b = 0  # pragma: no cover - used without SciPy only
    for i in range(a.size):
        for j in range(i + 1, a.size):
            da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif da == db:
                concordant += 1
            else:
                discordant += 1
    n0 = concordant + discordant
    denom = math.sqrt((n0 + ties_a) * (n0 + ties_b))
    return ((concordant - discordant) / denom if denom else NAN), NAN


def pareto_front(cost: Sequence[float], accuracy: Sequence[float]) -> List[int]:
    """Indices of the points no other point beats (lower or equal cost with higher accuracy, or lower cost
    with equal accuracy), ordered by cost."""
    c, a = _values(cost), _values(accuracy)
    order = sorted(range(c.size), key=lambda i: (c[i], -a[i]))
    front: List[int] = []
    best: Optional[float] = None
    for i in order:
        if best is None or a[i] > best:
            front.append(i)
            best = a[i]
    return front
