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
