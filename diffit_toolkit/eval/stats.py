"""The statistics of a mechanism comparison: Welch's t-test with its 95 % interval, Holm-Bonferroni
correction across all comparisons, the smallest difference a design can detect, and a verdict.

Each comparison is "mechanism A vs reference B" over independent training seeds; the metric is a
distance (lower is better). With five seeds per arm a 95 % interval is wide, so a comparison that
finds nothing says how large a difference it could have found
([`detectable_difference`][diffit_toolkit.eval.stats.detectable_difference]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Family-wise error rate of a benchmark's verdicts.
ALPHA = 0.05
#: Power at which the detectable difference is quoted.
POWER = 0.8


@dataclass(frozen=True)
class Welch:
    """Welch's t-test of ``mean(a) - mean(b)``.

    Attributes:
        diff: the difference of the means.
        low, high: its 95 % confidence interval (Welch-Satterthwaite degrees of freedom).
        p: two-sided p-value (uncorrected).
        dof: degrees of freedom.
    """

    diff: float
    low: float
    high: float
    p: float
    dof: float


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Welch:
    """Welch's unequal-variance t-test of ``mean(a) - mean(b)``; ``nan`` where a group has fewer
    than two values (no variance estimate)."""
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if len(a) < 2 or len(b) < 2:
        return Welch(diff, math.nan, math.nan, math.nan, math.nan)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:  # both groups constant: the difference is exact
        return Welch(diff, diff, diff, 0.0 if diff != 0 else 1.0, math.inf)
    ra, rb = va / (va + vb), vb / (va + vb)  # Welch-Satterthwaite, scaled (no underflow for tiny variances)
    dof = 1.0 / (ra**2 / (len(a) - 1) + rb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, dof) * se)
    p = float(2 * stats.t.sf(abs(diff) / se, dof))
    return Welch(diff, diff - half, diff + half, min(1.0, p), float(dof))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the given order: the i-th smallest of m p-values is
    multiplied by ``m - i`` (i from 0), made non-decreasing along the sorted order and capped at 1.
    Rejecting where the adjusted value is below alpha controls the family-wise error rate at alpha.
    ``nan`` entries stay ``nan`` and do not count in m."""
    valid = [(p, i) for i, p in enumerate(pvalues) if not math.isnan(p)]
    if any(not 0 <= p <= 1 for p, _ in valid):
        raise ValueError(f"p-values must lie in [0, 1], got {[p for p, _ in valid if not 0 <= p <= 1][0]}")
    adjusted = [math.nan] * len(pvalues)
    running, m = 0.0, len(valid)
    for rank, (p, i) in enumerate(sorted(valid)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def pooled_std(a: Sequence[float], b: Sequence[float]) -> float:
    """The pooled sample standard deviation of two groups (``nan`` with fewer than 3 values in all)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    dof = len(a) + len(b) - 2
    if len(a) < 1 or len(b) < 1 or dof < 1:
        return math.nan
    ss = (a.var(ddof=1) * (len(a) - 1) if len(a) > 1 else 0.0) + (b.var(ddof=1) * (len(b) - 1) if len(b) > 1 else 0.0)
    return float(math.sqrt(ss / dof))


def detectable_difference(std: float, n_a: int, n_b: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true difference of means that a two-sided t-test at level ``alpha`` finds with
    probability ``power``, for groups of ``n_a`` and ``n_b`` runs with standard deviation ``std``:
    ``(t[1 - alpha/2] + t[power]) * std * sqrt(1/n_a + 1/n_b)`` on ``n_a + n_b - 2`` degrees of freedom."""
    from scipy import stats

    dof = n_a + n_b - 2
    if dof < 1 or math.isnan(std):
        return math.nan
    return float((stats.t.ppf(1 - alpha / 2, dof) + stats.t.ppf(power, dof)) * std * math.sqrt(1 / n_a + 1 / n_b))


def verdict(diff: float, p_adjusted: float, alpha: float = ALPHA, lower_is_better: bool = True) -> str:
    """``better``, ``worse`` or ``no detectable difference`` for ``diff = candidate - reference``."""
    if math.isnan(p_adjusted) or p_adjusted >= alpha or diff == 0:
        return "no detectable difference"
    return "better" if (diff < 0) == lower_is_better else "worse"
