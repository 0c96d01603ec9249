"""DeLong's paired AUC difference against brute-force loops and a bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ihas_lightning.stats import paired_auc_difference


def _delong_loops(y, a, b):
    """The textbook DeLong variance, one pair of rows at a time: psi(x, z) = 1 if x > z, 1/2 if equal."""
    pos = [i for i in range(len(y)) if y[i]]
    neg = [i for i in range(len(y)) if not y[i]]

    def psi(x, z):
        return 1.0 if x > z else 0.5 if x == z else 0.0

    def comps(s):
        v10 = [sum(psi(s[i], s[j]) for j in neg) / len(neg) for i in pos]
        v01 = [sum(psi(s[i], s[j]) for i in pos) / len(pos) for j in neg]
        return v10, v01

    (a10, a01), (b10, b01) = comps(a), comps(b)

    def cov(u, v):
        mu, mv = sum(u) / len(u), sum(v) / len(v)
        return sum((x - mu) * (z - mv) for x, z in zip(u, v)) / (len(u) - 1)

    t_pos = (cov(a10, a10) + cov(b10, b10) - 2 * cov(a10, b10)) / len(pos)
    t_neg = (cov(a01, a01) + cov(b01, b01) - 2 * cov(a01, b01)) / len(neg)
    var = t_pos + t_neg
    df = var**2 / (t_pos**2 / (len(pos) - 1) + t_neg**2 / (len(neg) - 1))  # Welch-Satterthwaite
    return sum(a10) / len(a10) - sum(b10) / len(b10), var**0.5, df


def test_delong_equals_the_pairwise_loops_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(120) < 0.3
    a = np.round(y * 0.8 + rng.normal(size=120), 1)  # rounded: many ties within and across classes
    b = np.where(rng.random(120) < 0.2, np.round(rng.normal(size=120), 1), a)  # equal on ~80% of rows
    got = paired_auc_difference(y, a, b)
    diff, se, df = _delong_loops(y.tolist(), a.tolist(), b.tolist())
    assert got["df"] == pytest.approx(df, rel=1e-9)
    assert got["diff"] == pytest.approx(diff, abs=1e-12)
    assert got["diff"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    assert got["se"] == pytest.approx(se, rel=1e-9)
    lo, hi = got["ci"]
    assert lo == pytest.approx(diff - 1.959964 * se, abs=1e-6) and hi == pytest.approx(
        diff + 1.959964 * se, abs=1e-6
    )


def test_delong_se_matches_a_paired_bootstrap():
    rng = np.random.default_rng(1)
    n = 2000
    y = rng.random(n) < 0.25
    a = y * 1.0 + rng.normal(size=n)
    b = a + np.where(rng.random(n) < 0.1, rng.normal(size=n), 0.0)  # 10% of rows rescored
    se = paired_auc_difference(y, a, b)["se"]
    boot = []
    for _ in range(400):
        i = rng.integers(0, n, n)
        boot.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    assert se == pytest.approx(np.std(boot, ddof=1), rel=0.15)


def test_identical_scorings_have_no_variance_and_a_missing_class_no_interval():
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.9, 0.3, 0.2, 0.8, 0.5])
    got = paired_auc_difference(y, s, s.copy())
    assert got["diff"] == 0.0 and got["se"] == 0.0 and got["ci"] == [0.0, 0.0]
    assert paired_auc_difference(np.ones(4), s[:4], s[:4])["ci"] == [None, None]
    with pytest.raises(ValueError, match="5 scores for 6 labels"):
        paired_auc_difference(y, s[:5], s)


def test_the_difference_is_antisymmetric():
    rng = np.random.default_rng(2)
    y, a, b = rng.random(50) < 0.5, rng.normal(size=50), rng.normal(size=50)
    one, two = paired_auc_difference(y, a, b), paired_auc_difference(y, b, a)
    assert one["diff"] == pytest.approx(-two["diff"]) and one["se"] == pytest.approx(two["se"])
