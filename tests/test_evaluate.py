"""Evaluation helpers: the constant-predictor floor and the warnings a user must not miss."""

from __future__ import annotations

import math

import pytest
import torch

from ihas_lightning.stages.evaluate import constant_logloss, evaluate_warnings


def test_constant_logloss_matches_the_formula():
    y = torch.tensor([1.0, 0.0, 0.0, 0.0])
    want = -(math.log(0.25) + 3 * math.log(0.75)) / 4
    assert constant_logloss(y, 0.25) == pytest_approx(want)
    assert constant_logloss(torch.zeros(0), 0.3) is None


def pytest_approx(v):
    import pytest

    return pytest.approx(v, rel=1e-9)


def _row(model, va, vl, ta=0.7, tl=0.45):
    return {"model": model, "val_auc": va, "val_logloss": vl, "test_auc": ta, "test_logloss": tl}


def test_warnings_name_untrained_models_and_an_ihas_loss():
    const = _row("Constant", 0.5, 0.50, 0.5, 0.50)
    good = [_row("Base", 0.72, 0.48), _row("iHAS-1", 0.72, 0.48), _row("iHAS", 0.7205, 0.4805), const]
    assert evaluate_warnings(good) == []
    bad = [_row("Base", 0.66, 0.61, tl=0.62), _row("iHAS-1", 0.72, 0.48), _row("iHAS", 0.67, 0.49), const]
    w = evaluate_warnings(bad)
    assert any(s.startswith("Base has not trained: its val logloss 0.6100") for s in w)
    assert any(s.startswith("Base has not trained: its test logloss 0.6200") for s in w)
    assert not any("iHAS loses" in s for s in w)  # Base is worse here
    w = evaluate_warnings([_row("Base", 0.72, 0.47), _row("iHAS", 0.70, 0.48), const])
    assert len(w) == 2 and all("iHAS loses to Base on validation" in s for s in w)


def test_case_study_matrix_equals_a_loop_over_models_and_clusters():
    """Figure 6: model i on the test samples of cluster j, against a direct computation."""
    import torch
    from sklearn.metrics import log_loss, roc_auc_score

    from ihas_lightning.stages.evaluate import case_study

    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, 5, (40, 3), generator=g) for _ in range(2)]
    y = torch.randint(0, 2, (80,), generator=g).float()
    clusters = torch.randint(0, 3, (80,), generator=g)
    w = [torch.randn(3, generator=g) for _ in range(3)]
    models = [lambda x, mode, w=w_: x.float() @ w for w_ in w]
    cs = case_study(models, xs, y, clusters)
    x = torch.cat(xs)
    for i in range(3):
        for j in range(3):
            sel = clusters == j
            p = torch.sigmoid(x[sel].float() @ w[i]).double().numpy()
            assert abs(cs["auc"][i][j] - roc_auc_score(y[sel].numpy(), p)) < 1e-9
            assert abs(cs["logloss"][i][j] - log_loss(y[sel].numpy(), p, labels=[0, 1])) < 1e-6
    for j, c in enumerate(cs["per_cluster"]):
        others = [cs["auc"][i][j] for i in range(3) if i != j]
        assert abs(c["own_minus_others_auc"] - (cs["auc"][j][j] - sum(others) / 2)) < 1e-12
        assert c["own_is_best_auc"] == (cs["auc"][j][j] >= max(others))
    assert cs["samples"] == [int((clusters == j).sum()) for j in range(3)]


def test_vectorised_majority_rule_equals_the_cluster_stage():
    import numpy as np

    from ihas_lightning.stages.cluster import majority_dims
    from ihas_lightning.stats import majority_field_dims

    rng = np.random.default_rng(0)
    mean = rng.random((3, 4 * 5))
    mean[1] *= 0.3  # every dim below the threshold: the fallback keeps the top embed_dim dims
    mean[2, :3] = mean[2, 3]  # ties
    want, _, fallback = majority_dims(mean.copy(), 4, 5, 0.5)
    assert fallback == [False, True, False]
    got = majority_field_dims(mean, 4, 5, 0.5)
    assert got.tolist() == want
    batched = majority_field_dims(np.stack([mean, mean[::-1].copy()]), 4, 5, 0.5)
    assert batched[1].tolist() == majority_dims(mean[::-1].copy(), 4, 5, 0.5)[0]


def test_heterogeneity_statistic_and_its_permutation_null():
    import torch

    from ihas_lightning.stats import dims_difference, heterogeneity_test

    assert float(dims_difference(torch.tensor([[2, 0, 4], [0, 0, 1]]))) == (2 + 0 + 3) / 3
    # three clusters: the mean over the three pairs
    d3 = torch.tensor([[1, 1], [3, 1], [1, 5]])
    assert abs(float(dims_difference(d3)) - (1.0 + 2.0 + 3.0) / 3) < 1e-12
    g = torch.Generator().manual_seed(0)
    n, f, d = 600, 3, 4
    assign = torch.arange(n) % 2
    # cluster 0 opens field 0's dims, cluster 1 field 2's (each row 90% of its cluster's pattern)
    pattern = torch.zeros(2, f * d)
    pattern[0, :d] = 1
    pattern[1, 2 * d :] = 1
    masks = (torch.rand(n, f * d, generator=g) < 0.9).float() * pattern[assign]
    # keep_threshold 0.3: a permuted cluster's mean mask of fields 0 and 2 is ~0.45, well above it (at
    # 0.5 it would sit on the threshold and the null would flip dims at random: the null's job to show)
    het = heterogeneity_test(masks, assign, 2, f, d, 0.3, permutations=99, seed=1)
    assert het["statistic"] == (4 + 0 + 4) / 3
    assert het["p_value"] == 1 / 100 and het["null_mean"] == 0.0
    edge = heterogeneity_test(masks, assign, 2, f, d, 0.5, permutations=99, seed=1)
    assert edge["statistic"] == het["statistic"] and edge["p_value"] > 0.05 and edge["null_mean"] > 1.0
    # the soft statistic (expected open dims per field, no threshold) shows the difference at any threshold
    soft = [[sum(float(masks[assign == c][:, fi * d + j].mean()) for j in range(d)) for fi in range(f)]
            for c in range(2)]  # fmt: skip
    want = sum(abs(a - b) for a, b in zip(*soft)) / f
    for h in (het, edge):
        assert h["soft_statistic"] == pytest.approx(want, rel=1e-5) and h["soft_p_value"] == 1 / 100
        assert h["soft_null_q95"] < 0.2 * want
    # no difference between the clusters: not significant
    same = (torch.rand(n, f * d, generator=g) < 0.9).float() * pattern[0]
    het0 = heterogeneity_test(same, assign, 2, f, d, 0.3, permutations=99, seed=1)
    assert het0["statistic"] == 0.0 and het0["p_value"] == 1.0 and het0["soft_p_value"] > 0.05
    assert heterogeneity_test(masks, assign, 2, f, d, 0.3, 99, seed=1) == het  # seeded


def test_timing_sample_is_fixed_size_and_seeded():
    import torch

    from ihas_lightning.stages.evaluate import timing_sample

    xs = [torch.arange(10).view(5, 2), torch.arange(10, 16).view(3, 2)]
    x, replaced = timing_sample(xs, 20, 0)
    assert x.shape == (20, 2) and replaced
    assert torch.equal(x, timing_sample(xs, 20, 0)[0])
    y, replaced = timing_sample(xs, 4, 0)
    assert y.shape == (4, 2) and not replaced and len({tuple(r) for r in y.tolist()}) == 4
    assert timing_sample([], 5, 0)[0].numel() == 0
