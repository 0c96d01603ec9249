"""Statistics over seeds: mean, std and a t confidence interval; a win / lose / tie verdict."""

from __future__ import annotations

import math
from typing import Any


def mean_ci(values: list[float], level: float = 0.95) -> dict[str, Any]:
    """Mean, sample std and the two-sided t confidence interval of the mean (n >= 2)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci": [None, None]}
    m = sum(values) / n
    if n < 2:
        return {"n": 1, "mean": m, "std": None, "ci": [None, None]}
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": m, "std": sd, "ci": [m - half, m + half]}


def verdict(ci: dict[str, Any], higher_is_better: bool = True) -> str:
    """win / lose when the CI excludes 0 (in the better / worse direction), else tie."""
    lo, hi = ci["ci"]
    if lo is None:
        return "n/a"
    if lo > 0:
        return "win" if higher_is_better else "lose"
    if hi < 0:
        return "lose" if higher_is_better else "win"
    return "tie"


def paired_auc_difference(y: Any, a: Any, b: Any, level: float = 0.95) -> dict[str, Any]:
    """AUC(a) - AUC(b) of two scorings of the same rows (labels ``y``), with its standard error and
    two-sided confidence interval by DeLong's method for correlated ROC curves (DeLong, DeLong &
    Clarke-Pearson 1988), in the midrank form of Sun & Xu (2014): O(n log n), no resampling, so it
    holds at millions of rows.

    Each positive's placement is the share of negatives scored below it (ties count half), each
    negative's the share of positives above it; the AUC is the mean placement, and the covariance of
    the two scorings' placements over the positives and over the negatives gives the variance of the
    difference (0 when the two scorings agree on every row). ``diff``, ``se`` and ``ci`` are None when
    a class is missing."""
    import numpy as np
    from scipy import stats

    y = np.asarray(y).astype(bool).ravel()
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return {"diff": None, "se": None, "ci": [None, None], "level": level}
    v10, v01 = [], []
    for s in (a, b):
        s = np.asarray(s, dtype=np.float64).ravel()
        if s.shape != y.shape:
            raise ValueError(f"{s.shape[0]} scores for {y.shape[0]} labels")
        ranks = stats.rankdata(s)
        v10.append((ranks[y] - stats.rankdata(s[y])) / neg)  # negatives below each positive
        v01.append(1.0 - (ranks[~y] - stats.rankdata(s[~y])) / pos)  # positives above each negative
    diff = float(v10[0].mean() - v10[1].mean())
    var = 0.0
    for v, n in ((v10, pos), (v01, neg)):
        if n > 1:
            c = np.cov(np.vstack(v))
            var += float(c[0, 0] + c[1, 1] - 2.0 * c[0, 1]) / n
    se = math.sqrt(max(var, 0.0))
    half = float(stats.norm.ppf(0.5 + level / 2)) * se
    return {"diff": diff, "se": se, "ci": [diff - half, diff + half], "level": level}
