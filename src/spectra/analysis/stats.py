"""Statistics across seeds (METHOD.md §6; paper Table 13): Welch t-tests and bootstrap CIs.

Everything delegates to scipy: `scipy.stats.ttest_ind(a, b, equal_var=False)` for the Welch
test and `scipy.stats.bootstrap` (percentile method, seeded) for confidence intervals. With the
usual 3 seeds per cell both are coarse; they are reported, not over-interpreted. Fewer than two
values on either side, or no variance at all, gives nan (shown as "–"), never an exception.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
from scipy import stats

STAR_LEVELS = ((0.001, "***"), (0.01, "**"), (0.05, "*"))
CONFIDENCE = 0.95
N_RESAMPLES = 9999


class Welch(NamedTuple):
    t: float
    p: float
    df: float


def _clean(x) -> np.ndarray:
    a = np.asarray(x, dtype=float).ravel()
    return a[np.isfinite(a)]


def welch_ttest(a, b) -> Welch:
    """Two-sided Welch t-test of mean(a) vs mean(b); nan when either side has < 2 values."""
    a, b = _clean(a), _clean(b)
    if len(a) < 2 or len(b) < 2:
        return Welch(math.nan, math.nan, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # identical samples: scipy warns, returns nan
        r = stats.ttest_ind(a, b, equal_var=False)
    return Welch(float(r.statistic), float(r.pvalue), float(getattr(r, "df", math.nan)))


def stars(p: float) -> str:
    """'***' p<0.001, '**' p<0.01, '*' p<0.05, '' otherwise (and for nan)."""
    if p is None or not math.isfinite(p):
        return ""
    for level, mark in STAR_LEVELS:
        if p < level:
            return mark
    return ""


def format_p(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _mean_diff(a, b, axis=-1):
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def bootstrap_ci(x, seed: int = 0, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of x; (nan, nan) with fewer than 2 values."""
    x = _clean(x)
    if len(x) < 2:
        return (math.nan, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = stats.bootstrap((x,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                            method="percentile", rng=np.random.default_rng(seed), vectorized=True)
    return (float(r.confidence_interval.low), float(r.confidence_interval.high))


def bootstrap_diff_ci(a, b, seed: int = 0, confidence: float = CONFIDENCE,
                      n_resamples: int = N_RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(a) − mean(b), resampling a and b independently."""
    a, b = _clean(a), _clean(b)
    if len(a) < 2 or len(b) < 2:
        return (math.nan, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = stats.bootstrap((a, b), _mean_diff, n_resamples=n_resamples, confidence_level=confidence,
                            method="percentile", rng=np.random.default_rng(seed), vectorized=True)
    return (float(r.confidence_interval.low), float(r.confidence_interval.high))
