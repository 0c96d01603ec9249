"""Evaluation helpers: the constant-predictor floor and the warnings a user must not miss."""

from __future__ import annotations

import math

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
