"""Small-sample statistics for comparisons over seeds: means with 95 % t-intervals.

A comparison of two strategies (or two pipelines) over a few seeds is a handful of numbers; the
question "is this difference real?" is answered by the t-interval of the mean (of the paired
differences, when the runs share a seed). No scipy: Student's t quantiles for 95 % are tabulated.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

# two-sided 95 % quantiles of Student's t, t_{0.975, df}, df = 1..30 (then the normal's 1.96 is within 2 %)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def t975(df: int) -> float:
    """Student's t quantile for a two-sided 95 % interval with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"a t-interval needs at least 2 values (df >= 1), got df={df}")
    return T975[df - 1] if df <= len(T975) else 1.96


def mean_ci(values: Sequence[float]) -> dict:
    """``{"n", "mean", "sd", "lo", "hi"}``: the mean and its 95 % t-interval (lo/hi None for one value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values")
    n, mean = len(values), statistics.fmean(values)
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "lo": None, "hi": None}
    sd = statistics.stdev(values)
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def paired_ci(a: Sequence[float], b: Sequence[float]) -> dict:
    """``mean_ci`` of the differences a_i - b_i (runs i of a and b share a seed, or a batch stream)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    return mean_ci([x - y for x, y in zip(a, b)])


def unpaired_ci(a: Sequence[float], b: Sequence[float]) -> dict:
    """Welch's 95 % interval of mean(a) - mean(b) for independent samples (lo/hi None below 2 each)."""
    ma, mb = mean_ci(a), mean_ci(b)
    out = {"n": min(ma["n"], mb["n"]), "mean": ma["mean"] - mb["mean"], "sd": None, "lo": None, "hi": None}
    if ma["n"] < 2 or mb["n"] < 2:
        return out
    va, vb = ma["sd"] ** 2 / ma["n"], mb["sd"] ** 2 / mb["n"]
    se = math.sqrt(va + vb)
    if se == 0:
        out.update(lo=out["mean"], hi=out["mean"])
        return out
    df = (va + vb) ** 2 / (va ** 2 / (ma["n"] - 1) + vb ** 2 / (mb["n"] - 1))  # Welch-Satterthwaite
    half = t975(max(1, math.floor(df))) * se
    out.update(lo=out["mean"] - half, hi=out["mean"] + half)
    return out


def spans_zero(ci: dict) -> bool | None:
    """True when the interval contains 0 (the difference could be noise); None without an interval."""
    if ci.get("lo") is None:
        return None
    return ci["lo"] <= 0 <= ci["hi"]


def format_ci(ci: dict, digits: int = 2) -> str:
    """``+1.23 [-0.40, +2.86]`` (or ``+1.23 (1 seed)``)."""
    if ci["lo"] is None:
        return f"{ci['mean']:+.{digits}f} ({ci['n']} value)"
    return f"{ci['mean']:+.{digits}f} [{ci['lo']:+.{digits}f}, {ci['hi']:+.{digits}f}]"
