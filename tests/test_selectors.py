"""The AdaFS, AutoField and OptFS selectors, each pinned against a brute-force / hand computation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ihas_lightning.models.selectors.adafs import AdaFSSelector
from ihas_lightning.models.selectors.autofield import AutoFieldSelector
from ihas_lightning.models.selectors.optfs import OptFSSelector

N, D, B = 5, 3, 8
VOCAB = [4, 7, 2, 5, 3]


def batch(seed: int = 0, dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(B, N * D, generator=g)
    x = torch.stack([torch.randint(0, v, (B,), generator=g) for v in VOCAB], dim=1).to(dtype)
    return e, x


def field_bn(e: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm1d(d) in train mode at its init (weight 1, bias 0): per dim over batch x fields."""
    out = torch.empty_like(e)
    for j in range(D):
        cols = [f * D + j for f in range(N)]
        v = e[:, cols]
        out[:, cols] = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + eps)
    return out


# ---- AdaFS ---------------------------------------------------------------------------------------
def adafs_weights(sel: AdaFSSelector, e_bn: torch.Tensor) -> torch.Tensor:
    lin, bn, _, _ = sel.controller
    return torch.softmax(torch.relu(bn(lin(e_bn))), dim=1)


def test_adafs_soft_matches_loop():
    torch.manual_seed(0)
    sel = AdaFSSelector(N, D, VOCAB)
    assert sel.default_arch_update == "bilevel" and sel.k == N // 2 and sel.derive() is None
    e, x = batch()
    sel.eval()  # dropout off; BN running stats at init (mean 0, var 1)
    out, aux = sel(e, x, "deterministic")
    e_bn = e / math.sqrt(1 + 1e-5)
    c = adafs_weights(sel, e_bn)
    assert torch.allclose(aux["weights"], c, atol=1e-6)
    ref = torch.empty_like(e)
    for b in range(B):
        for f in range(N):
            ref[b, f * D : (f + 1) * D] = c[b, f] * e_bn[b, f * D : (f + 1) * D]
    assert torch.allclose(out, ref, atol=1e-6)


def test_adafs_train_mode_bn_over_batch_and_fields():
    torch.manual_seed(0)
    sel = AdaFSSelector(N, D, VOCAB, dropout=0.0)
    e, x = batch(1)
    out, _ = sel(e, x, "open")
    assert torch.allclose(out, field_bn(e), atol=1e-5)
    out, aux = sel(e, x, "stochastic")
    c = aux["weights"]
    assert torch.allclose(c.sum(1), torch.ones(B), atol=1e-6)
    assert torch.allclose(out.view(B, N, D), field_bn(e).view(B, N, D) * c[..., None], atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_adafs_hard_keeps_k_renormalised(k):
    torch.manual_seed(1)
    sel = AdaFSSelector(N, D, VOCAB, hard=True, k=k).eval()
    e, x = batch(2)
    out, aux = sel(e, x, "deterministic")
    mask = aux["weights"]
    e_bn = e / math.sqrt(1 + 1e-5)
    with torch.no_grad():
        c = adafs_weights(sel, e_bn)
    for b in range(B):
        # the ReLU on the logits makes ties (c = exp(0)/Z) common: topk may keep any of the tied
        # fields, so check the kept set is *a* top-k set and its weights are c[idx] / sum(c[idx])
        kept = [f for f in range(N) if mask[b, f] != 0]
        assert len(kept) == k
        dropped = [f for f in range(N) if f not in kept]
        cb = [float(v) for v in c[b]]
        assert sorted((cb[f] for f in kept), reverse=True) == pytest.approx(sorted(cb, reverse=True)[:k])
        if dropped:
            assert min(cb[f] for f in kept) >= max(cb[f] for f in dropped)
        total = sum(cb[f] for f in kept)
        for f in range(N):
            want = cb[f] / total if f in kept else 0.0
            assert mask[b, f].item() == pytest.approx(want, abs=1e-6)
            assert torch.allclose(out[b, f * D : (f + 1) * D], want * e_bn[b, f * D : (f + 1) * D], atol=1e-6)
    # the controller learns through the kept weights (with k = 1 the lone weight is constant 1)
    out.pow(2).sum().backward()
    grad = sel.controller[0].weight.grad
    assert grad is not None and (grad.abs().sum() > 0) == (k > 1)


def test_adafs_k_validated():
    with pytest.raises(ValueError):
        AdaFSSelector(N, D, VOCAB, hard=True, k=0)
    with pytest.raises(ValueError):
        AdaFSSelector(N, D, VOCAB, hard=True, k=N + 1)


def test_adafs_open_skips_controller_and_arch_params():
    torch.manual_seed(0)
    sel = AdaFSSelector(N, D, VOCAB)
    arch = sel.arch_parameters()
    assert {id(p) for p in arch} == {id(p) for p in sel.controller.parameters()}
    assert not {id(p) for p in arch} & {id(p) for p in sel.emb_bn.parameters()}
    e, x = batch()
    e.requires_grad_(True)
    out, aux = sel(e, x, "open")
    assert aux == {}
    out.pow(2).sum().backward()
    assert all(p.grad is None for p in arch)
    assert int(sel.controller[1].num_batches_tracked) == 0  # the controller's BN never ran
    assert sel.emb_bn.weight.grad is not None
    assert int(sel.emb_bn.num_batches_tracked) == 1
    nobn = AdaFSSelector(N, D, VOCAB, batchnorm=False)
    assert torch.equal(nobn(e, x, "open")[0], e)


# ---- AutoField -----------------------------------------------------------------------------------
def test_autofield_tau_schedule_matches_loop():
    sel = AutoFieldSelector(N, D, VOCAB, tau_start=1.0, tau_min=0.9, tau_decay=0.013)
    assert sel.default_arch_update == "bilevel"
    ref = torch.tensor(1.0)
    for _ in range(12):
        sel.on_train_step()
        if ref > 0.9:
            ref = torch.clamp(ref - 0.013, min=0.9)
    assert torch.equal(sel.tau, ref)
    assert float(sel.tau) == pytest.approx(0.9)
    sel.on_train_step()
    assert float(sel.tau) == pytest.approx(0.9)
    # the default schedule against the closed form, in Python floats
    sel = AutoFieldSelector(N, D, VOCAB)
    for _ in range(300):
        sel.on_train_step()
    assert float(sel.tau) == pytest.approx(1.0 - 300 * 5e-5, abs=1e-5)


def test_autofield_forward_and_eval_leave_tau():
    torch.manual_seed(0)
    sel = AutoFieldSelector(N, D, VOCAB)
    sel.on_train_step()
    tau = sel.tau.clone()
    e, x = batch()
    for mode in ("open", "stochastic", "deterministic"):
        sel.train()(e, x, mode)
        sel.eval()(e, x, mode)
        with torch.no_grad():
            sel(e, x, mode)
    assert torch.equal(sel.tau, tau)


def test_autofield_forwards():
    torch.manual_seed(0)
    sel = AutoFieldSelector(N, D, VOCAB)
    with torch.no_grad():
        sel.alpha.copy_(torch.randn(N, 2))
    e, x = batch()
    assert torch.equal(sel(e, x, "open")[0], e)
    out, aux = sel(e, x, "stochastic")
    g = aux["weights"]
    assert g.shape == (N,)
    ratio = out.view(B, N, D) / e.view(B, N, D)
    assert torch.allclose(ratio, g.view(1, N, 1).expand(B, N, D), atol=1e-5)  # one weight per field
    g2 = sel(e, x, "stochastic")[1]["weights"]
    assert not torch.allclose(g, g2)  # a fresh noise draw per forward
    out, aux = sel(e, x, "deterministic")
    tau = float(sel.tau)
    for f in range(N):
        a0, a1 = (float(v) / tau for v in sel.alpha.detach()[f])
        want = math.exp(a1) / (math.exp(a0) + math.exp(a1))
        assert aux["weights"][f].item() == pytest.approx(want, abs=1e-6)
        assert torch.allclose(out[:, f * D : (f + 1) * D], want * e[:, f * D : (f + 1) * D], atol=1e-6)
    assert torch.equal(sel(e, x, "deterministic")[0], out)


@pytest.mark.parametrize("k", [None, 1, 3, N])
def test_autofield_derive_top_k(k):
    torch.manual_seed(3)
    sel = AutoFieldSelector(N, D, VOCAB, k=2)
    with torch.no_grad():
        sel.alpha.copy_(torch.randn(N, 2))
    arch = sel.derive(k=k)
    kk = 2 if k is None else k
    select = sel.alpha[:, 1].tolist()
    top = sorted(range(N), key=lambda f: -select[f])[:kk]
    assert arch.field_keep == [f in top for f in range(N)]
    assert sum(arch.field_keep) == kk
    assert arch.scores["k"] == kk and arch.scores["alpha_select"] == pytest.approx(select)


# ---- OptFS ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_optfs_forward_matches_loop(dtype):
    torch.manual_seed(0)
    sel = OptFSSelector(N, D, VOCAB, mask_init=0.5)
    assert sel.default_arch_update == "joint"
    e, x = batch(4, dtype)
    out, aux = sel(e, x, "stochastic")
    assert torch.equal(aux["mask"], torch.ones(B, N))  # m = 1 at init
    assert torch.equal(out, e)
    with torch.no_grad():
        sel.w.copy_(torch.randn(sum(VOCAB)))
        sel.tau.fill_(3.0)
    out, aux = sel(e, x, "deterministic")
    out2, _ = sel(e, x, "stochastic")
    assert torch.equal(out, out2)
    assert torch.equal(sel(e, x, "open")[0], e)
    for b in range(B):
        for f in range(N):
            row = sum(VOCAB[:f]) + int(x[b, f])
            m = 1 / (1 + math.exp(-3.0 * float(sel.w.detach()[row]))) / (1 / (1 + math.exp(-0.5)))
            assert aux["mask"][b, f].item() == pytest.approx(m, rel=1e-5)
            assert torch.allclose(out[b, f * D : (f + 1) * D], m * e[b, f * D : (f + 1) * D], atol=1e-5)


def test_optfs_regularizer_full_table():
    torch.manual_seed(0)
    sel = OptFSSelector(N, D, VOCAB, lambda_reg=1e-3)
    with torch.no_grad():
        sel.w.copy_(torch.randn(sum(VOCAB)))
        sel.tau.fill_(2.0)
    e, x = batch()
    _, aux = sel(e, x, "stochastic")
    want = 1e-3 * sum(1 / (1 + math.exp(-2.0 * float(w))) for w in sel.w.detach())
    reg = sel.regularizer(aux)
    assert float(reg.detach()) == pytest.approx(want, rel=1e-5)
    reg.backward()
    assert bool((sel.w.grad != 0).all())  # every row of the table, not only the batch's
    assert sel.regularizer({}) is None  # open mode: the gate is bypassed


def test_optfs_tau_schedule():
    sel = OptFSSelector(N, D, VOCAB, final_temp=200.0)
    E = 5
    for ep in range(E):
        sel.on_search_epoch_start(ep, E)
        assert float(sel.tau) == pytest.approx(200.0 ** (ep / (E - 1)), rel=1e-6)
        if ep == 0:
            assert float(sel.tau) == 1.0
    assert float(sel.tau) == pytest.approx(200.0)
    sel.on_search_epoch_start(0, 1)
    assert float(sel.tau) == 1.0
    sel.on_train_step()  # no per-step schedule
    assert float(sel.tau) == 1.0


def test_optfs_derive():
    torch.manual_seed(5)
    sel = OptFSSelector(N, D, VOCAB)
    with torch.no_grad():
        sel.w.copy_(torch.randn(sum(VOCAB)))
    arch = sel.derive()
    assert arch.field_keep is None
    assert arch.row_keep.dtype == torch.bool and torch.equal(arch.row_keep, sel.w.detach() > 0)
    per_field, start = [], 0
    for v in VOCAB:
        per_field.append(sum(int(w > 0) for w in sel.w.detach()[start : start + v]))
        start += v
    assert arch.scores["kept_per_field"] == per_field
    assert arch.scores["kept_share"] == pytest.approx(sum(per_field) / sum(VOCAB))


# ---- all -----------------------------------------------------------------------------------------
def advanced(cls):
    sel = cls(N, D, VOCAB)
    for _ in range(7):
        sel.on_train_step()
    sel.on_search_epoch_start(2, 4)
    return sel


@pytest.mark.parametrize("cls", [AdaFSSelector, AutoFieldSelector, OptFSSelector])
def test_state_dict_round_trip(cls):
    torch.manual_seed(0)
    sel = advanced(cls)
    fresh = cls(N, D, VOCAB)
    state = sel.state_dict()
    assert "offsets" not in state
    fresh.load_state_dict(state)
    for k, v in sel.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    if hasattr(sel, "tau"):
        assert "tau" in state and float(fresh.tau) != 1.0 and torch.equal(fresh.tau, sel.tau)
    stats = sel.statistics()
    assert isinstance(stats, dict)
    json.dumps(stats)


# ---- PEP ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ttype", ["feature_dim", "feature", "field_dim", "field", "dimension", "global"])
def test_pep_forward_equals_the_full_table_threshold_then_lookup(ttype):
    from ihas_lightning.models.selectors.pep import PEPSelector

    torch.manual_seed(0)
    sel = PEPSelector(N, D, VOCAB, threshold_type=ttype, s_init=-4.0, budgets=[0.5])
    with torch.no_grad():
        sel.s.normal_(-4.0, 1.0)
    table = torch.randn(sum(VOCAB), D) * 0.05
    x = torch.stack([torch.randint(0, v, (9,)) for v in VOCAB], 1)
    rows = x + torch.tensor([0, *VOCAB[:-1]]).cumsum(0)
    e = table[rows].reshape(9, -1)
    out, _ = sel(e, x, "stochastic")
    # brute force: threshold the whole table (the authors' forward), then look the rows up
    field_of = [f for f, v in enumerate(VOCAB) for _ in range(v)]
    full = torch.empty_like(table)
    for r in range(table.shape[0]):
        for j in range(D):
            pick = {"feature_dim": (r, j), "feature": (r, 0), "field_dim": (field_of[r], j),
                    "field": (field_of[r], 0), "dimension": (0, j), "global": (0, 0)}[ttype]  # fmt: skip
            s = sel.s[pick]
            v = table[r, j]
            full[r, j] = torch.sign(v) * torch.relu(v.abs() - torch.sigmoid(s))
    assert torch.allclose(out, full[rows].reshape(9, -1), atol=1e-7)
    assert sel.count_nonzero(table) == int((full != 0).sum())


def test_pep_requests_one_snapshot_per_budget_in_order_and_then_stops():
    from ihas_lightning.models import DLRM
    from ihas_lightning.models.selectors.pep import PEPSelector

    torch.manual_seed(0)
    sel = PEPSelector(N, D, VOCAB, s_init=-20.0, budgets=[0.5, 0.2, 20], check_every=1)
    model = DLRM(VOCAB, embed_dim=D, selector=sel)
    total = sum(VOCAB) * D  # 63 entries: budgets 32, 20 (absolute) and 13
    assert [sel.budget_entries(b) for b in sel.budgets] == [32, 20, 13] and sel.retrain_budget == 0.2
    seen = []
    for level in (-20.0, -4.6, -4.0, -3.0, 5.0):  # raise the threshold step by step
        with torch.no_grad():
            sel.s.fill_(level)
        tags = sel.snapshot_requests(model)
        nnz = sel.count_nonzero(model.embedding.tables[0].weight)
        for t in tags:
            b = float(t.split("_")[1])
            assert nnz <= sel.budget_entries(b) <= total
        seen += tags
    assert len(seen) == 3 and len(set(seen)) == 3 and sel.search_done()
    assert sel.snapshot_requests(model) == []  # every budget saved: nothing more


def test_pep_retrains_the_sparsest_budget_reached_and_never_an_unreached_one(tmp_path):
    import pytest

    from ihas_lightning.errors import ConfigError
    from ihas_lightning.models import DLRM
    from ihas_lightning.models.selectors.pep import PEPSelector

    torch.manual_seed(0)
    sel = PEPSelector(N, D, VOCAB, s_init=-20.0, budgets=[0.5, 0.3, 0.1], retrain_budget=0.1)
    model = DLRM(VOCAB, embed_dim=D, selector=sel)
    w = model.embedding.tables[0].weight
    with torch.no_grad():
        sel.s.fill_(float(torch.logit(torch.quantile(w.abs().flatten(), 0.6))))  # ~40% kept: 0.5 reached
    tags = sel.snapshot_requests(model)
    assert tags == ["budget_0.5"]
    snap = tmp_path / "budget_0.5.pt"
    torch.save(model.state_dict(), snap)
    arch = sel.derive(snapshots={"budget_0.5": snap})
    assert arch.scores["budget"] == 0.5 and arch.scores["requested"] == 0.1 and arch.scores["fallback"]
    assert arch.scores["kept_entries"] <= sel.budget_entries(0.5)
    # the strict mode, and no budget reached at all: an error, never an invented budget
    strict = PEPSelector(
        N, D, VOCAB, s_init=-20.0, budgets=[0.5, 0.3, 0.1], retrain_budget=0.1, fallback="error"
    )
    with pytest.raises(ValueError, match="never reached the budget 0.1"):
        strict.derive(snapshots={"budget_0.5": snap})
    with pytest.raises(ValueError, match="never reached the budget 0.1"):
        sel.derive(snapshots={})
    with pytest.raises(ConfigError, match="method.selector.fallback"):
        PEPSelector(N, D, VOCAB, budgets=[0.5], fallback="densest")


def test_entry_masked_table_trains_and_serves_only_kept_entries():
    from ihas_lightning.models.embedding import FieldEmbedding

    torch.manual_seed(0)
    emb = FieldEmbedding(VOCAB, D, sparse=False, entry_masked=True)
    mask = torch.rand(sum(VOCAB), D) > 0.7
    emb.set_entry_mask(mask)
    w = emb.tables[0].weight
    assert torch.all(w[~mask] == 0) and emb.embedding_entries() == int(mask.sum())
    x = torch.stack([torch.randint(0, v, (32,)) for v in VOCAB], 1)
    emb.train()
    emb(x).sum().backward()
    assert torch.all(w.grad[~mask] == 0)  # a masked entry gets no gradient
    with torch.no_grad():
        w.add_(1.0)  # even if something moved the masked entries, eval materialises the mask
    emb.eval()
    rows = x + torch.tensor([0, *VOCAB[:-1]]).cumsum(0)
    assert torch.equal(emb(x), (w * mask)[rows].reshape(32, -1))


# ---- OptEmbed -----------------------------------------------------------------------------------------
def test_optembed_surrogate_gradient_is_the_authors_piecewise_function():
    from ihas_lightning.models.selectors.optembed import surrogate_step

    u = torch.tensor([-1.5, -0.7, -0.3, 0.0, 0.2, 0.4, 0.9, 1.2], requires_grad=True)
    h = surrogate_step(u)
    assert h.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    h.sum().backward()
    want = [0.0, 0.4, 2 - 4 * 0.3, 2.0, 2 - 4 * 0.2, 2 - 4 * 0.4, 0.4, 0.0]
    assert torch.allclose(u.grad, torch.tensor(want))


def test_optembed_forward_masks_rows_and_keeps_prefix_dims():
    from ihas_lightning.models.selectors.optembed import OptEmbedSelector

    torch.manual_seed(0)
    sel = OptEmbedSelector(N, D, VOCAB, t_init=0.5)
    e = torch.randn(B, N * D) * 0.3
    x = torch.zeros(B, N, dtype=torch.long)
    e3 = e.view(B, N, D)
    keep = (e3.abs().sum(-1) > 0.5).float()
    out, aux = sel(e, x, "deterministic")
    assert torch.equal(out.view(B, N, D), e3 * keep.unsqueeze(-1)) and torch.equal(aux["row_mask"], keep)
    sel.eval_dims = [1, 3, 2, 1, 3]
    out = sel(e, x, "deterministic")[0].view(B, N, D)
    for f, c in enumerate(sel.eval_dims):  # brute force: field f keeps its first c dims
        assert torch.equal(out[:, f, :c], (e3 * keep.unsqueeze(-1))[:, f, :c]) and torch.all(
            out[:, f, c:] == 0
        )
    sel.eval_dims = None
    out = sel(e, x, "stochastic")[0].view(B, N, D)
    for b in range(B):
        for f in range(N):
            if keep[b, f]:
                nz = (out[b, f] != 0).int().tolist()
                k = sum(nz)
                assert 1 <= k <= D and nz == [1] * k + [0] * (D - k)  # a prefix of a random size


def test_optembed_evolution_finds_the_best_candidate_and_scores_each_once():
    from ihas_lightning.models.selectors.optembed import OptEmbedSelector

    sel = OptEmbedSelector(6, 4, [3] * 6, population=10, generations=15, mutation_prob=0.3, seed=1)
    target = [4, 1, 3, 2, 4, 1]
    calls = []

    def evaluate():
        calls.append(tuple(sel.eval_dims))
        return -sum(abs(a - b) for a, b in zip(sel.eval_dims, target))

    best, score, info = sel.evolve(evaluate)
    assert score == max(-sum(abs(a - b) for a, b in zip(c, target)) for c in calls)  # the best ever scored
    assert score >= -2 and best == list(best) and len(calls) == len(set(calls)) == info["scored_candidates"]
    assert sel.eval_dims is None  # the supernet is left as it was
    hist = [h["best"] for h in info["history"]]
    assert hist == sorted(hist)
