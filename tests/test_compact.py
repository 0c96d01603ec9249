"""The serving layouts of a retrained cluster model (FoldedMLP, CompactMLP) and of fast-routed iHAS
(FusedRouting): the same logits as the trained DLRMs."""

from __future__ import annotations

import pytest
import torch

from ihas_lightning.models import DLRM
from ihas_lightning.models.compact import CompactMLP, FoldedMLP, compact, compactable, foldable
from ihas_lightning.models.fused import FusedRouting, stacked_tails
from ihas_lightning.models.router import LinearRouter
from ihas_lightning.routing import RoutedModel, cluster_features, dispatch
from ihas_lightning.serving import ServingModule

VOCAB = [7, 3, 11, 5, 2, 9]


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, v, (n,), generator=g) for v in VOCAB], 1)


def _trained_like(dims, seed: int = 0, **kw) -> DLRM:
    torch.manual_seed(seed)
    m = DLRM(VOCAB, 16, field_dims=dims, hidden=(16, 8), **kw)
    for t in m.embedding.tables:  # larger than the init so that a wrong column would show
        torch.nn.init.normal_(t.weight)
    return m.eval()


@pytest.mark.parametrize(
    "dims", [[16, 0, 8, 3, 16, 1], [0, 0, 5, 0, 0, 0], [4, 4, 4, 4, 4, 2], [16, 16, 16, 16, 16, 0]]
)
def test_compact_gives_the_source_models_logits(dims):
    m = _trained_like(dims, batchnorm=True)
    x = _ids(257)
    c = CompactMLP(m)
    assert c.width == max(dims)
    with torch.no_grad():
        torch.testing.assert_close(c(x), m(x), rtol=0, atol=1e-6)
        # the rows path (what dispatch uses) reads the same ids
        rows = torch.tensor([5, 0, 256, 5, 17])
        torch.testing.assert_close(c.forward_rows(x, rows), m(x[rows]), rtol=0, atol=1e-6)
    assert c.num_parameters() == m.num_parameters()


@pytest.mark.parametrize("layout", [CompactMLP, FoldedMLP])
def test_compact_against_a_brute_force_loop(layout):
    """Per sample: concatenate each kept field's row in field order, then the MLP (pytorch-fm style)."""
    dims = [3, 0, 8, 16, 1, 5]
    m = _trained_like(dims, seed=3)
    c = layout(m)
    x = _ids(20, seed=3)
    with torch.no_grad():
        for i in range(len(x)):
            parts = [m.embedding.field_weight(f)[x[i, f]] for f in range(len(VOCAB)) if dims[f]]
            want = m.backbone.net(torch.cat(parts).unsqueeze(0)).squeeze()
            torch.testing.assert_close(c(x[i : i + 1])[0], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "dims", [[16, 0, 8, 3, 16, 1], [0, 0, 5, 0, 0, 0], [16] * 6, [16, 16, 16, 16, 16, 0]]
)
def test_folded_gives_the_source_models_logits(dims):
    m = _trained_like(dims, batchnorm=True)
    x = _ids(257)
    c = FoldedMLP(m)
    assert c.hidden == 16 and tuple(c.table.shape) == (sum(v for v, d in zip(VOCAB, dims) if d), 16)
    with torch.no_grad():  # folding re-associates float32 sums: equal up to rounding
        torch.testing.assert_close(c(x), m(x), rtol=1e-5, atol=1e-5)
        rows = torch.tensor([5, 0, 256, 5, 17])
        torch.testing.assert_close(c.forward_rows(x, rows), m(x[rows]), rtol=1e-5, atol=1e-5)
    assert c.num_parameters() == m.num_parameters()


def test_compact_folds_where_it_pays_and_pads_a_wide_first_layer():
    """H1 <= 4 x the widest kept field: folded (uniform models too); a wider first layer: padded when
    packed by size, as it is when uniform."""
    assert isinstance(compact(_trained_like([16, 0, 8, 3, 16, 1])), FoldedMLP)
    assert isinstance(compact(_trained_like([4, 4, 4, 4, 4, 2])), FoldedMLP)  # 16 <= 4 x 4
    assert isinstance(compact(DLRM(VOCAB, 16).eval()), FoldedMLP)  # Base's layout too
    wide = DLRM(VOCAB, 16, field_dims=[2, 3, 0, 2, 1, 3], hidden=(16, 8)).eval()  # 16 > 4 x 3
    assert not foldable(wide) and isinstance(compact(wide), CompactMLP)
    uniform_wide = DLRM(VOCAB, 4, hidden=(32, 8)).eval()
    assert compact(uniform_wide) is uniform_wide


def test_what_is_not_compacted_is_served_as_it_is():
    assert not compactable(DLRM(VOCAB, 16))  # uniform: already one lookup
    for m in (DLRM(VOCAB, 16, field_dims=[0] * len(VOCAB)),  # no kept field
              DLRM(VOCAB, 16, field_dims=[4, 8, 0, 4, 4, 4], backbone="fm")):  # fmt: skip
        assert not compactable(m) and not foldable(m) and compact(m) is m
    gated = DLRM(VOCAB, 16, gate={})
    assert compact(gated) is gated
    with pytest.raises(ValueError, match="CompactMLP needs"):
        CompactMLP(gated)
    with pytest.raises(ValueError, match="FoldedMLP needs"):
        FoldedMLP(gated)


def test_a_compact_routed_model_routes_and_predicts_as_the_trained_one():
    torch.manual_seed(0)
    search = DLRM(VOCAB, 16, gate={}).eval()
    models = [
        _trained_like([16, 0, 8, 3, 16, 1], 1),
        DLRM(VOCAB, 16).eval(),
        _trained_like([2, 2, 0, 3, 0, 1], 2),  # 16 > 4 x 3: padded, not folded
    ]
    router = LinearRouter(VOCAB, 3)
    torch.nn.init.normal_(router.weight.weight)
    x = _ids(500, seed=5)
    with torch.no_grad():
        centroids = cluster_features(search, x)[0][torch.tensor([0, 100, 200])]  # each near some rows
    routed = RoutedModel(search, centroids, models, router=router).eval()
    for r in (routed, routed.with_fast_routing()):
        c = r.compact()
        layouts = [type(m) for m in c.cluster_models]
        assert layouts == [FoldedMLP, FoldedMLP, CompactMLP] and c.fused is None  # one is not foldable
        with torch.no_grad():
            got, clusters = c.forward_with_clusters(x)
            want, want_clusters = r.forward_with_clusters(x)
        assert torch.equal(clusters, want_clusters) and c.fast == r.fast
        assert len(set(clusters.tolist())) == 3  # every cluster has rows
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        # and each row equals its own cluster's trained model
        with torch.no_grad():
            loop = torch.stack([models[int(k)](x[i : i + 1])[0] for i, k in enumerate(clusters)])
        torch.testing.assert_close(got, loop, rtol=0, atol=1e-6)


def test_dispatch_with_an_empty_cluster():
    m = [_trained_like([4, 0, 8, 3, 16, 1], 1), _trained_like([2, 2, 0, 9, 0, 4], 2)]
    cm = [compact(a) for a in m]
    x = _ids(64)
    clusters = torch.ones(64, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(dispatch(x, clusters, cm), m[1](x), rtol=0, atol=1e-6)


def test_fused_fast_routing_reads_each_id_once_and_routes_as_the_router():
    """Router + every folded cluster model in one table: the router's own clusters (to the bit) and
    each row's own cluster model's logit; also against a per-sample loop."""
    torch.manual_seed(0)
    search = DLRM(VOCAB, 16, gate={}).eval()
    models = [
        _trained_like([16, 0, 8, 3, 16, 1], 1),
        DLRM(VOCAB, 16).eval(),
        _trained_like([2, 5, 0, 9, 0, 4], 2),
    ]
    router = LinearRouter(VOCAB, 3)
    torch.nn.init.normal_(router.weight.weight)
    x = _ids(500, seed=5)
    with torch.no_grad():
        centroids = cluster_features(search, x)[0][:3]
    fast = RoutedModel(search, centroids, models, router=router).eval().compact().with_fast_routing()
    assert isinstance(fast.fused, FusedRouting)
    assert tuple(fast.fused.table.shape) == (sum(VOCAB), 3 + 3 * 16)
    with torch.no_grad():
        got, clusters = fast.forward_with_clusters(x)
        assert torch.equal(clusters, router.route(x)) and len(set(clusters.tolist())) == 3
        torch.testing.assert_close(got, dispatch(x, clusters, models), rtol=0, atol=1e-6)
        loop = torch.stack([models[int(k)](x[i : i + 1])[0] for i, k in enumerate(clusters)])
        torch.testing.assert_close(got, loop, rtol=0, atol=1e-6)
        # the exported graph's module computes the same
        p, c = ServingModule(routed=fast)(x)
        assert torch.equal(c, clusters)
        torch.testing.assert_close(p, torch.sigmoid(got), rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 cluster models for a 3-way router"):
        FusedRouting(router, fast.cluster_models[:2])


@pytest.mark.parametrize("kw", [{}, {"batchnorm": True, "dropout": 0.3}])
def test_fused_routing_runs_the_clusters_layers_side_by_side(kw):
    """The clusters' remaining layers stacked (block-diagonal linears, concatenated batchnorm statistics):
    each row's logit equals its own cluster's model, with and without batchnorm / dropout."""
    torch.manual_seed(0)
    models = [_trained_like([16, 0, 8, 3, 16, 1], 1, **kw), _trained_like([16, 5, 0, 9, 2, 4], 2, **kw)]
    for m in models:  # non-trivial batchnorm statistics, so that a wrong column would show
        for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm1d)):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            torch.nn.init.normal_(bn.weight)
    router = LinearRouter(VOCAB, 2)
    torch.nn.init.normal_(router.weight.weight)
    fused = FusedRouting(router, [compact(m) for m in models])
    assert fused.stacked is not None
    kinds = [type(m).__name__ for m in fused.stacked]
    assert kinds == (["BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"] if kw
                     else ["ReLU", "Linear", "ReLU", "Linear"])  # fmt: skip
    x = _ids(400, seed=3)
    with torch.no_grad():
        got, clusters = fused(x)
        assert len(set(clusters.tolist())) == 2
        loop = torch.stack([models[int(k)](x[i : i + 1])[0] for i, k in enumerate(clusters)])
        torch.testing.assert_close(got, loop, rtol=0, atol=1e-6)
        fused.stacked = None  # the per-cluster layers give the same
        torch.testing.assert_close(fused(x)[0], got, rtol=0, atol=1e-6)


def test_stacked_tails_need_the_same_layers():
    a = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    b = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(16, 1))
    c = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    assert stacked_tails([a, b]) is None and stacked_tails([a, c]) is None
    s = stacked_tails([a, a])
    assert s is not None and [type(m).__name__ for m in s] == ["ReLU", "Linear", "ReLU", "Linear"]
    h = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(s(h), torch.cat([a(h[:, :16]), a(h[:, 16:])], 1), rtol=0, atol=1e-6)
