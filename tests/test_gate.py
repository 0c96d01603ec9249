"""Bernoulli gate (paper section 3.3): ST Gumbel-Softmax, threshold searcher, polarization regularizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ihas_lightning.models import BernoulliGate, gate_regularizer, threshold_search


def test_st_gumbel_forward_binary_and_gradients_reach_gate():
    torch.manual_seed(0)
    gate = BernoulliGate(24, tau=0.1, init_bias=0.0)
    e = torch.randn(64, 24)
    mask, p = gate(e, "stochastic")
    assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
    assert torch.equal(mask, mask.round())  # exactly 0/1, not just close
    (mask * torch.randn(64, 24)).sum().backward()
    assert gate.linear.weight.grad is not None and gate.linear.weight.grad.abs().sum() > 0
    assert gate.linear.bias.grad.abs().sum() > 0


def test_st_gumbel_is_a_bernoulli_draw_with_probability_p():
    torch.manual_seed(1)
    gate = BernoulliGate(4, instance_wise=False, init_bias=0.0)
    with torch.no_grad():
        gate.logits.copy_(torch.logit(torch.tensor([0.05, 0.3, 0.7, 0.95])))
    mask, p = gate(torch.zeros(40_000, 4), "stochastic")
    assert torch.allclose(mask.mean(0), p[0], atol=0.01)


def test_the_frozen_gates_hard_draw_is_the_gumbel_max_draw_of_the_same_noise():
    """The model step's draw (z needs no gradient) is ``u < p``; the Gumbel-Max draw of the ST path,
    ``z + logit(u) > 0``, is ``u > 1 - p``: on the mirrored noise 1 - u they are the same draw, entry by
    entry, save float ties; both are Bernoulli(p); saturated gates stay saturated."""
    torch.manual_seed(3)
    gate = BernoulliGate(32, init_bias=0.0)
    z = torch.randn(4_000, 32) * 4
    z[0], z[1] = 30.0, -30.0  # open and closed for good
    torch.manual_seed(7)
    hard = gate.stochastic_mask(z)  # no gradient wanted: the cheap draw
    torch.manual_seed(7)
    u = torch.rand_like(z).clamp_(1e-6, 1 - 1e-6)
    assert torch.equal(hard, (u < torch.sigmoid(z)).float())
    gumbel_max = (z + torch.logit(1 - u) > 0).float()  # the ST path's forward on the mirrored noise
    assert (hard != gumbel_max).float().mean() < 1e-4
    assert hard[0].eq(1).all() and hard[1].eq(0).all()
    zg = z.clone().requires_grad_(True)
    st = gate.stochastic_mask(zg)  # the ST path: same distribution
    assert abs(float(st.mean()) - float(hard.mean())) < 0.01
    assert torch.allclose(hard[2:].mean(0), torch.sigmoid(z[2:]).mean(0), atol=0.04)


def test_open_mode_all_ones_and_noninstance_wise_shared():
    gate = BernoulliGate(8, instance_wise=False, init_bias=1.0)
    mask, p = gate(torch.randn(5, 8), "open")
    assert torch.equal(mask, torch.ones(5, 8))
    assert torch.equal(p, p[:1].expand(5, -1))  # the same gate vector for every sample
    with pytest.raises(ValueError):
        gate(torch.randn(5, 8), "bogus")


def reference_threshold(p: np.ndarray, bins: int, fallback: float = 0.5) -> float:
    """Brute force, one sample: histogram, then the first valley bin's lower edge."""
    counts = [0] * bins
    for v in p:
        counts[min(int(np.float32(v) * np.float32(bins)), bins - 1)] += 1
    for b in range(1, bins - 1):
        if counts[b] < counts[b - 1] and counts[b] <= counts[b + 1] and max(counts[b + 1 :]) > counts[b]:
            return b / bins
    return fallback


def _check(p: torch.Tensor, bins: int) -> None:
    got = threshold_search(p, bins)
    want = torch.tensor([reference_threshold(row, bins) for row in p.numpy()], dtype=p.dtype)
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("bins", [5, 20])
def test_threshold_matches_bruteforce_on_random_bimodal(bins):
    g = torch.Generator().manual_seed(bins)
    b, d = 300, 64
    lo = torch.rand(b, d, generator=g) * torch.rand(b, 1, generator=g) * 0.4
    hi = 1 - torch.rand(b, d, generator=g) * torch.rand(b, 1, generator=g) * 0.4
    pick = torch.rand(b, d, generator=g) < torch.rand(b, 1, generator=g)
    p = torch.where(pick, hi, lo)
    _check(p, bins)
    _check(torch.rand(b, d, generator=g), bins)  # noisy uniform histograms: many small valleys


def test_threshold_edge_cases():
    bins = 10
    rows = [
        [0.5] * 12,  # all equal -> one bin, no valley -> fallback 0.5
        [0.31, 0.32, 0.33, 0.34],  # all in one bin
        [0.0] * 6 + [1.0] * 6,  # p exactly 0 and 1: bin 0 and the last bin
        [0.05] * 5 + [0.15] * 3 + [0.25] * 2 + [0.35],  # unimodal, decreasing: no second mode
        [0.05] * 4 + [0.95] * 4,  # empty plateau between two modes -> its first bin
        [0.05] * 4 + [0.15] * 4 + [0.95] * 2,  # plateau of a mode (equal bins), then valley
        [0.05, 0.45, 0.45, 0.95, 0.95, 0.95],  # left mode smaller than the middle: first valley wins
        [0.55] * 3 + [0.95] * 3,  # both modes in the upper half
        [0.0] * 12,
        [1.0] * 12,
    ]
    for r in rows:  # rows differ in length: one at a time
        _check(torch.tensor([r], dtype=torch.float32), bins)
    thr = threshold_search(torch.tensor([[0.05] * 4 + [0.95] * 4]), bins)
    assert thr.item() == pytest.approx(0.1)  # the valley's first (lower) bin edge
    t, found = threshold_search(torch.tensor([[0.5] * 8, [0.05] * 4 + [0.95] * 4]), bins, return_found=True)
    assert found.tolist() == [False, True] and t[0].item() == 0.5


def test_deterministic_mask_opens_above_threshold():
    gate = BernoulliGate(8, bins=10)
    p = torch.tensor([[0.02, 0.03, 0.04, 0.9, 0.95, 0.97, 0.01, 0.92]])
    assert gate.deterministic_mask(p).tolist() == [[0, 0, 0, 1, 1, 1, 0, 1]]


def test_half_threshold_opens_where_p_exceeds_one_half_against_a_loop():
    """method.gate.threshold=half: a dim is open where its p > 0.5, sample by sample; the valley rule
    opens the middle mode of a three-mode histogram (p ~ 0, 0.2-0.35, ~1), which half closes. The
    histogram's 'found' statistic is the same under both rules."""
    g = torch.Generator().manual_seed(3)
    b, d = 200, 48
    lo = torch.rand(b, d, generator=g) * 0.03
    mid = 0.2 + torch.rand(b, d, generator=g) * 0.15
    hi = 1 - torch.rand(b, d, generator=g) * 0.03
    r = torch.rand(b, d, generator=g)
    p = torch.where(r < 0.8, lo, torch.where(r < 0.9, mid, hi))
    p[0] = 0.5  # exactly 0.5 stays closed under half (p > threshold)
    valley, half = BernoulliGate(d, bins=20), BernoulliGate(d, bins=20, threshold="half")
    mh = half.deterministic_mask(p)
    for i in range(b):
        for j in range(d):
            assert mh[i, j].item() == float(p[i, j].item() > 0.5)
    mv = valley.deterministic_mask(p)
    is_mid = (p > 0.1) & (p < 0.5)
    assert mv[1:][is_mid[1:]].min() == 1 and mh[is_mid].max() == 0
    assert torch.equal(valley.threshold(p, True)[1], half.threshold(p, True)[1])
    with pytest.raises(ValueError, match="threshold"):
        BernoulliGate(4, threshold="otsu")


def test_half_threshold_reaches_the_deterministic_forward_and_the_folded_gate():
    from ihas_lightning.models import DLRM

    torch.manual_seed(0)
    m = DLRM([7, 5, 9], embed_dim=4, gate={"threshold": "half", "init_bias": 0.0})
    with torch.no_grad():
        m.gate.linear.weight.normal_(std=2.0)
    m.eval()
    x = torch.stack([torch.randint(0, v, (64,)) for v in (7, 5, 9)], 1)
    e = m.embedding(x)
    _, aux = m.selector(e, x, "deterministic")
    assert torch.equal(aux["mask"], (aux["p"] > 0.5).to(aux["p"].dtype))
    assert (aux["threshold"] == 0.5).all()
    assert m.fold_gate().startswith("folded into")
    with torch.no_grad():
        _, folded = m.selector(e, x, "deterministic")
    assert torch.equal(folded["mask"], aux["mask"])


def test_regularizer_matches_hand_computation():
    p = torch.tensor([[0.1, 0.9, 0.5], [0.2, 0.2, 0.8]])
    # sample 1: mean 0.5, |dev| = .4 .4 0 -> sum(p) - sum|dev| = 1.5 - 0.8 = 0.7
    # sample 2: mean 0.4, |dev| = .2 .2 .4 -> 1.2 - 0.8 = 0.4
    assert gate_regularizer(p, 2.0, polarization=True).item() == pytest.approx(2.0 * (0.7 + 0.4) / 2)
    assert gate_regularizer(p, 2.0, polarization=False).item() == pytest.approx(2.0 * (1.5 + 1.2) / 2)


def test_polarization_weight_against_a_brute_force_loop():
    torch.manual_seed(0)
    p = torch.rand(5, 7)
    for beta in (0.0, 0.1, 0.5, 1.0):
        want = 0.0
        for row in p.tolist():
            m = sum(row) / len(row)
            want += sum(x - beta * abs(x - m) for x in row)
        got = gate_regularizer(p, 3.0, polarization=True, polarization_weight=beta).item()
        assert got == pytest.approx(3.0 * want / 5, rel=1e-5)
    # beta = 0 is the sparsity-only ablation
    assert gate_regularizer(p, 3.0, True, 0.0).item() == pytest.approx(gate_regularizer(p, 3.0, False).item())


def test_polarization_weight_below_one_closes_every_open_dim():
    # a = 1/3 of the dims above the mean: the paper's term (beta 1) pushes that dim further open
    # (d/dp = 2a - 1 < 0); with beta 0.1 every dim is pushed closed (d/dp = 1 - 2 beta (1 - a) > 0)
    for beta, opens in ((1.0, True), (0.1, False)):
        p = torch.tensor([[0.1, 0.2, 0.9]], requires_grad=True)
        gate_regularizer(p, 1.0, True, beta).backward()
        assert (p.grad[0, 2].item() < 0) is opens
        assert p.grad[0, 2].item() == pytest.approx(1 - 2 * beta * (1 - 1 / 3), abs=1e-6)
    assert (p.grad[0] > 0).all()


def test_polarization_gradient_pushes_away_from_mean():
    p = torch.tensor([[0.3, 0.6, 0.9]], requires_grad=True)
    gate_regularizer(p, 1.0, polarization=True).backward()
    # descent direction -grad: below-mean p goes down, above-mean p goes up (modulo sparsity)
    g = p.grad[0]
    assert g[0] > g[2]


# ---- gate input normalisation (method.gate.input_norm) ----------------------------------------------
def test_center_input_tracks_running_mean_in_training_only():
    torch.manual_seed(0)
    gate = BernoulliGate(6, input_norm="center")
    shift = torch.tensor([5.0, -3.0, 0.0, 1.0, 2.0, -1.0])
    e1, e2 = torch.randn(256, 6) + shift, torch.randn(256, 6) + shift
    gate.train()
    gate.gate_logits(e1)
    assert torch.allclose(gate.input_mean, e1.mean(0))  # the first batch initialises the mean
    gate.gate_logits(e2)
    assert torch.allclose(gate.input_mean, 0.9 * e1.mean(0) + 0.1 * e2.mean(0), atol=1e-6)
    frozen = gate.input_mean.clone()
    gate.eval()
    z = gate.gate_logits(e2)
    assert torch.equal(gate.input_mean, frozen)  # evaluation never moves it
    # the linear layer reads E - mean: same logits as a plain linear layer on the centred input
    assert torch.allclose(z, gate.linear(e2 - frozen), atol=1e-6)


def test_center_removes_a_constant_offset_of_the_embedding():
    """A constant added to every sample's embedding cannot move the centred gate (it can the paper's)."""
    torch.manual_seed(1)
    e = torch.randn(512, 8)
    plain, centred = BernoulliGate(8), BernoulliGate(8, input_norm="center")
    with torch.no_grad():
        nn_w = torch.randn(8, 8)
        plain.linear.weight.copy_(nn_w)
        centred.linear.weight.copy_(nn_w)
    outs = {}
    for name, g in (("plain", plain), ("centred", centred)):
        zs = []
        for off in (0.0, 3.0):
            g.train()
            g.gate_logits(e + off)  # one training batch sets the running mean
            g.eval()
            zs.append(g.gate_logits(e + off))
            if name == "centred":
                g.input_count.zero_()
        outs[name] = zs
    assert not torch.allclose(outs["plain"][0], outs["plain"][1])
    assert torch.allclose(outs["centred"][0], outs["centred"][1], atol=1e-5)


def test_batch_input_norm_and_state_dict_round_trip():
    from ihas_lightning.models import DLRM

    torch.manual_seed(2)
    for norm in ("center", "batch"):
        a = DLRM([7, 5, 9], embed_dim=4, gate={"tau": 0.1, "input_norm": norm})
        a.train()
        x = torch.randint(0, 5, (128, 3))
        a(x, "stochastic")  # updates the normalisation buffers
        b = DLRM([7, 5, 9], embed_dim=4, gate={"tau": 0.1, "input_norm": norm})
        b.load_state_dict(a.state_dict())
        a.eval(), b.eval()
        assert torch.equal(a(x, "deterministic"), b(x, "deterministic")), norm
    with pytest.raises(ValueError, match="input_norm"):
        BernoulliGate(4, input_norm="layer")
