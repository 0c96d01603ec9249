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
