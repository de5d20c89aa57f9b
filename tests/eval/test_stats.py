"""The benchmark's statistics: Holm against a hand-computed example, Welch against scipy, the
detectable difference against a simulation, and properties of the adjusted p-values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffit_toolkit.eval.stats import detectable_difference, holm, pooled_std, verdict, welch


def test_holm_matches_a_hand_computed_example():
    # sorted: 0.01 (x4) = 0.04, 0.02 (x3) = 0.06, 0.03 (x2) = 0.06, 0.04 (x1) = 0.04 -> running max 0.06
    assert holm([0.04, 0.01, 0.03, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([0.3, 0.2]) == pytest.approx([0.4, 0.4])  # 0.3 (x1) is raised to 0.4: the order is kept
    assert holm([0.9, 0.6]) == pytest.approx([1.0, 1.0])  # 0.6 (x2) capped at 1
    nan = holm([math.nan, 0.02, 0.04])
    assert math.isnan(nan[0]) and nan[1:] == pytest.approx([0.04, 0.04])  # m = 2: the nan does not count


def test_holm_refuses_values_outside_0_1():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.1, 1.5])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=12))
def test_holm_adjusted_values_are_p_values_above_the_raw_ones_and_keep_their_order(ps):
    adjusted = holm(ps)
    assert all(0 <= q <= 1 for q in adjusted)
    assert all(q >= p - 1e-15 for p, q in zip(ps, adjusted))
    assert all(q <= min(1.0, len(ps) * p) + 1e-12 for p, q in zip(ps, adjusted))  # never worse than Bonferroni
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    assert all(adjusted[order[i]] <= adjusted[order[i + 1]] for i in range(len(ps) - 1))  # monotone


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-100, 100), min_size=2, max_size=8), st.lists(st.floats(-100, 100), min_size=2, max_size=8))
def test_welch_matches_scipy_and_its_interval_holds_the_difference(a, b):
    from scipy import stats

    result = welch(a, b)
    assert 0 <= result.p <= 1
    assert result.low <= result.diff <= result.high
    if np.var(a) > 1e-9 and np.var(b) > 1e-9:
        assert result.p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9, abs=1e-12)
        # the interval excludes 0 exactly when p < 0.05
        assert (result.low > 0 or result.high < 0) == (result.p < 0.05) or abs(result.p - 0.05) < 1e-9


def test_welch_with_one_value_has_no_interval():
    result = welch([1.0], [2.0, 3.0])
    assert result.diff == -1.5 and math.isnan(result.p) and math.isnan(result.low)


def test_detectable_difference_has_the_promised_power():
    # simulate the design: two groups of 5 with std 1 and a true difference of the detectable size
    std, n = 1.0, 5
    mdd = detectable_difference(std, n, n)
    rng = np.random.default_rng(0)
    hits = sum(welch(rng.normal(mdd, std, n), rng.normal(0, std, n)).p < 0.05 for _ in range(2000))
    assert 0.72 < hits / 2000 < 0.86  # about 80 % (Welch is a little less powerful than the pooled t-test)
    assert detectable_difference(std, 20, 20) < mdd / 2  # more seeds, smaller detectable difference
    assert detectable_difference(std, n, n, alpha=0.01) > mdd  # a stricter level, a larger one
    assert math.isnan(detectable_difference(std, 1, 1))


def test_pooled_std_and_verdicts():
    assert pooled_std([1, 3], [2, 4]) == pytest.approx(math.sqrt(2))
    assert verdict(-2.0, 0.01) == "better" and verdict(2.0, 0.01) == "worse"
    assert verdict(-2.0, 0.2) == "no detectable difference" and verdict(-2.0, math.nan) == "no detectable difference"
    assert verdict(2.0, 0.01, lower_is_better=False) == "better"
