"""The study's statistics against independent references (scipy, a direct bootstrap) and its verdicts."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from megacpt.demo.stats import (HOLDS, INCONCLUSIVE, REFUTED, Interval, bootstrap_test_var, paired_difference,
                                t_interval, verdict)


@pytest.mark.parametrize("values", [[1.0, 2.0, 4.0], [3.2, 3.1, 3.3, 2.9, 3.05], [10.0, 12.5]])
def test_t_interval_matches_scipy(values):
    iv = t_interval(values)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert iv.mean == pytest.approx(np.mean(values)) and iv.n == len(values)
    assert (iv.lo, iv.hi) == pytest.approx((lo, hi), rel=1e-12)


def test_paired_difference_matches_scipy_ttest_rel():
    a, b = [5.0, 6.1, 5.7, 6.3], [4.2, 5.9, 5.0, 5.1]
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    d = paired_difference(a, b)
    assert (d.lo, d.hi) == pytest.approx((ci.low, ci.high), rel=1e-12)
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0, 2.0], [1.0])


def test_test_set_variance_widens_the_interval():
    same = [2.0, 2.0, 2.0]                       # no run-to-run spread: only the test-set part remains
    iv = t_interval(same, test_var=0.01)
    assert iv.hi - iv.mean == pytest.approx(stats.t.ppf(0.975, 2) * 0.1)
    assert t_interval([1.0, 2.0, 3.0], test_var=0.5).hi > t_interval([1.0, 2.0, 3.0]).hi
    one = t_interval([4.0])
    assert one.mean == 4.0 and math.isnan(one.lo) and verdict(one, "better", 0.0) == INCONCLUSIVE


def test_bootstrap_test_var_against_direct_bootstrap():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=200)
    v = bootstrap_test_var({"x": 200}, lambda rows: float(x[rows["x"]].mean()), n_boot=4000, seed=1)
    direct = np.var([x[rng.integers(0, 200, 200)].mean() for _ in range(4000)], ddof=1)
    assert v == pytest.approx(direct, rel=0.1) and v == pytest.approx(x.var() / 200, rel=0.1)
    # paired: a difference of two arms on the same resampled items loses the items' common part
    y = x + rng.normal(0, 0.1, size=200)
    paired = bootstrap_test_var({"x": 200}, lambda r: float(x[r["x"]].mean() - y[r["x"]].mean()), 2000, 2)
    assert paired == pytest.approx(np.var(x - y) / 200, rel=0.15) and paired < v / 100
    # two sets are resampled independently: variances add
    both = bootstrap_test_var({"x": 200, "z": 200}, lambda r: float(x[r["x"]].mean() + x[r["z"]].mean()), 4000, 3)
    assert both == pytest.approx(2 * x.var() / 200, rel=0.12)


def _iv(lo, hi):
    return Interval((lo + hi) / 2, lo, hi, 3, 1.0)


@pytest.mark.parametrize("lo,hi,kind,margin,expect", [
    (-0.01, 0.05, "at_least", 0.02, HOLDS),          # within the non-inferiority margin
    (0.01, 0.05, "at_least", 0.02, HOLDS),
    (-0.10, -0.03, "at_least", 0.02, REFUTED),       # worse by more than the margin, for sure
    (-0.05, 0.01, "at_least", 0.02, INCONCLUSIVE),   # could be either
    (0.001, 0.2, "better", 0.02, HOLDS),             # significantly better
    (-0.05, 0.01, "better", 0.02, REFUTED),          # no gain as large as the margin
    (-0.3, -0.1, "better", 0.02, REFUTED),           # significantly worse
    (-0.05, 0.10, "better", 0.02, INCONCLUSIVE),
])
def test_verdicts(lo, hi, kind, margin, expect):
    assert verdict(_iv(lo, hi), kind, margin) == expect


def test_verdict_rejects_bad_input():
    with pytest.raises(ValueError):
        verdict(_iv(0, 1), "maybe", 0.1)
    with pytest.raises(ValueError):
        verdict(_iv(0, 1), "better", -1)
    with pytest.raises(ValueError):
        t_interval([1.0, float("nan")])
