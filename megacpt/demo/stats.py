"""Statistics of the study: means over seeds with 95% intervals, paired differences, and verdicts.

The unit of replication is the seed (one CPT run: its training order, and for sampled subsets the
draw). Two sources of error enter a comparison of arms:

- run to run: the spread of the per-seed values (``s²/n``, Student t with ``n − 1`` degrees of freedom);
- test set: every model is scored on the same finite test set; its sampling error is estimated by a
  bootstrap over test items that resamples the *same* items for every model (paired), given as the
  variance of the statistic over those resamples (``test_var``).

An interval is ``mean ± t(0.975, n − 1) · sqrt(s²/n + test_var)`` (docs/method.md §4.3). The two parts
overlap a little (each per-seed value also carries the part of the test-set error that differs between
seeds), so the interval is slightly conservative.

Verdicts are decided from the interval of a difference ``d`` oriented so that positive is better for
the claim, against a margin ``δ`` fixed before any run:

- ``at_least`` (A ≥ B, non-inferiority): holds if ``lo > −δ``; refuted if ``hi < −δ``; else inconclusive;
- ``better`` (A > B, superiority): holds if ``lo > 0``; refuted if ``hi < δ`` (no gain as large as the
  margin is compatible with the data); else inconclusive.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats as _st

HOLDS, REFUTED, INCONCLUSIVE = "holds", "refuted", "inconclusive"


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    n: int                 # seeds
    sd: float              # per-seed standard deviation (NaN for n < 2)
    test_sd: float = 0.0   # test-set bootstrap standard error of the mean (0: not estimated)

    def as_dict(self) -> dict:
        return asdict(self)

    def fmt(self, digits: int = 2) -> str:
        if not math.isfinite(self.lo):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {(self.hi - self.lo) / 2:.{digits}f}"


def t_interval(values: Sequence[float], test_var: float = 0.0, level: float = 0.95) -> Interval:
    """Mean of per-seed ``values`` with a t interval; ``test_var``: extra variance of the mean (test set)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or not np.isfinite(v).all():
        raise ValueError(f"t_interval needs finite values, got {list(v)}")
    n, mean = v.size, float(v.mean())
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), n, float("nan"), math.sqrt(test_var))
    sd = float(v.std(ddof=1))
    se = math.sqrt(sd * sd / n + max(test_var, 0.0))
    half = float(_st.t.ppf(0.5 + level / 2, n - 1)) * se
    return Interval(mean, mean - half, mean + half, n, sd, math.sqrt(max(test_var, 0.0)))


def paired_difference(a: Sequence[float], b: Sequence[float], test_var: float = 0.0) -> Interval:
    """Interval of mean(a − b) over seeds paired by index (seed s of arm a against seed s of arm b)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired difference needs the same seeds on both sides: {a.size} vs {b.size}")
    return t_interval(a - b, test_var)


def bootstrap_test_var(sizes: dict[str, int], statistic: Callable[[dict[str, np.ndarray]], float],
                       n_boot: int = 400, seed: int = 0) -> float:
    """Variance of ``statistic`` over resamples of the test items.

    ``sizes``: test set -> number of items; each draw resamples every set with replacement and passes
    ``{set: item indices}`` to ``statistic`` (e.g. the mean over seeds of a metric difference between two
    arms, each recomputed on those items), so one draw uses the same items for every seed and both arms
    of a difference: the variance is the test-set part of the seed mean's error.
    """
    if n_boot <= 1 or not sizes or min(sizes.values()) == 0:
        return 0.0
    rng = np.random.default_rng(seed)
    vals = np.array([statistic({k: rng.integers(0, n, n) for k, n in sizes.items()}) for _ in range(n_boot)])
    return float(vals.var(ddof=1))


def verdict(diff: Interval, kind: str, margin: float) -> str:
    """holds / refuted / inconclusive for a difference oriented so that positive favours the claim."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    lo, hi = diff.lo, diff.hi
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE
    if kind == "at_least":
        return HOLDS if lo > -margin else REFUTED if hi < -margin else INCONCLUSIVE
    if kind == "better":
        return HOLDS if lo > 0 else REFUTED if hi < margin else INCONCLUSIVE
    raise ValueError(f"unknown claim kind {kind!r}: expected at_least or better")
