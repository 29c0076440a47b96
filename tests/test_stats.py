"""95 % intervals over seeds (fastvit_reduce.stats), against scipy's own where it is installed."""
import math

import pytest

from fastvit_reduce.stats import format_ci, mean_ci, paired_ci, spans_zero, t975, unpaired_ci


def test_t_quantiles_and_intervals_match_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 10, 29, 30):
        assert t975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=6e-4)
    values = [84.1, 82.7, 83.9, 85.0]
    ci = mean_ci(values)
    lo, hi = scipy_stats.t.interval(0.95, len(values) - 1, loc=ci["mean"], scale=scipy_stats.sem(values))
    assert (ci["lo"], ci["hi"]) == pytest.approx((lo, hi), abs=1e-3)
    welch = scipy_stats.ttest_ind([1.0, 2.0, 3.5], [0.5, 0.7, 0.2, 0.1], equal_var=False)
    u = unpaired_ci([1.0, 2.0, 3.5], [0.5, 0.7, 0.2, 0.1])
    assert u["mean"] == pytest.approx(2.1667 - 0.375, abs=1e-3) and u["lo"] < u["mean"] < u["hi"]
    assert (u["lo"] > 0) == (welch.pvalue < 0.05)


def test_paired_differences_and_words():
    ci = paired_ci([85.3, 83.3, 85.1], [84.1, 82.7, 83.9])
    assert ci["mean"] == pytest.approx(1.0) and ci["n"] == 3 and not spans_zero(ci)
    assert spans_zero(paired_ci([1.0, -1.0, 0.5], [0.0, 0.0, 0.0])) is True
    assert spans_zero(mean_ci([3.0])) is None and format_ci(mean_ci([3.0])) == "+3.00 (1 value)"
    assert format_ci(mean_ci([1.0, 3.0])) == f"+2.00 [{2 - 12.706 * math.sqrt(2) / math.sqrt(2):+.2f}, " \
                                              f"{2 + 12.706:+.2f}]"
    with pytest.raises(ValueError, match="equal lengths"):
        paired_ci([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        t975(0)
