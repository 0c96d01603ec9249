"""The serving layout of a retrained cluster model (CompactMLP): the same logits as the trained DLRM."""

from __future__ import annotations

import pytest
import torch

from ihas_lightning.models import DLRM
from ihas_lightning.models.compact import CompactMLP, compact, compactable
from ihas_lightning.models.router import LinearRouter
from ihas_lightning.routing import RoutedModel, cluster_features, dispatch

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


def test_compact_against_a_brute_force_loop():
    """Per sample: concatenate each kept field's row in field order, then the MLP (pytorch-fm style)."""
    dims = [3, 0, 8, 16, 1, 5]
    m = _trained_like(dims, seed=3)
    c = CompactMLP(m)
    x = _ids(20, seed=3)
    with torch.no_grad():
        for i in range(len(x)):
            parts = [m.embedding.field_weight(f)[x[i, f]] for f in range(len(VOCAB)) if dims[f]]
            want = m.backbone.net(torch.cat(parts).unsqueeze(0)).squeeze()
            torch.testing.assert_close(c(x[i : i + 1])[0], want, rtol=0, atol=1e-6)


def test_what_is_not_compacted_is_served_as_it_is():
    assert not compactable(DLRM(VOCAB, 16))  # uniform: already one lookup
    assert not compactable(DLRM(VOCAB, 16, field_dims=[0] * len(VOCAB)))  # no kept field
    assert not compactable(DLRM(VOCAB, 16, field_dims=[4, 8, 0, 4, 4, 4], backbone="fm"))
    gated = DLRM(VOCAB, 16, gate={})
    assert compact(gated) is gated
    with pytest.raises(ValueError, match="CompactMLP needs"):
        CompactMLP(gated)


def test_a_compact_routed_model_routes_and_predicts_as_the_trained_one():
    torch.manual_seed(0)
    search = DLRM(VOCAB, 16, gate={}).eval()
    models = [
        _trained_like([16, 0, 8, 3, 16, 1], 1),
        DLRM(VOCAB, 16).eval(),
        _trained_like([2, 2, 0, 9, 0, 4], 2),
    ]
    router = LinearRouter(VOCAB, 3)
    torch.nn.init.normal_(router.weight.weight)
    x = _ids(500, seed=5)
    with torch.no_grad():
        centroids = cluster_features(search, x)[0][torch.tensor([0, 100, 200])]  # each near some rows
    routed = RoutedModel(search, centroids, models, router=router).eval()
    for r in (routed, routed.with_fast_routing()):
        c = r.compact()
        assert isinstance(c.cluster_models[0], CompactMLP) and c.cluster_models[1] is models[1]
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
