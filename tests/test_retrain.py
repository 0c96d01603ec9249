"""Retraining stage: per-cluster model shapes, init from the searched tables, routed inference, resume."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import stage_cfg_factory
from ihas_lightning.models import DLRM
from ihas_lightning.modules.retrain import RetrainModule
from ihas_lightning.routing import RoutedModel, dispatch, nearest_centroid

MODEL = {"embed_dim": 4, "hidden": [16, 8], "lr": 1e-3, "embedding_optimizer": "sparse_adam"}


def test_retrained_model_shapes_match_selected_dims():
    vocab = [10, 20, 30, 40]
    dims = [3, 0, 4, 1]
    kept = [[0, 1, 3], [], [0, 1, 2, 3], [2]]
    m = RetrainModule(vocab, MODEL, field_dims=dims, kept_dims=kept)
    emb = m.model.embedding
    assert [s.stop - s.start for s in emb.field_slices()] == dims
    assert m.model.mlp.in_dim == sum(dims) == 8
    first = m.model.mlp.net[0]
    assert tuple(first.weight.shape) == (16, 8)
    for f, d in enumerate(dims):
        if d:
            assert tuple(emb.field_weight(f).shape) == (vocab[f], d)
        else:
            with pytest.raises(KeyError):
                emb.field_weight(f)
    # the dropped field has no table rows at all
    assert sum(t.weight.numel() for t in emb.tables) == sum(v * d for v, d in zip(vocab, dims))
    x = torch.randint(0, 10, (5, 4))
    assert m.model(x).shape == (5,) and m.model.embed(x).shape == (5, 8)
    with pytest.raises(ValueError):
        RetrainModule(vocab, MODEL, field_dims=dims, kept_dims=[[0], [], [0], [0]])


def test_init_from_searched_copies_kept_columns():
    torch.manual_seed(0)
    vocab = [10, 20, 30]
    searched = DLRM(vocab, embed_dim=4, gate=dict(tau=0.1))
    for t in searched.embedding.tables:
        torch.nn.init.normal_(t.weight)
    kept = [[1, 3], [], [0, 1, 2, 3]]
    m = RetrainModule(vocab, MODEL, field_dims=[2, 0, 4], kept_dims=kept)
    m.init_from_searched(searched)
    for f, cols in enumerate(kept):
        if cols:
            torch.testing.assert_close(
                m.model.embedding.field_weight(f), searched.embedding.field_weight(f)[:, cols]
            )


def test_routed_predictions_equal_each_samples_cluster_model():
    torch.manual_seed(1)
    vocab = [30, 30, 30]
    search = DLRM(vocab, embed_dim=4, gate=dict(tau=0.1, init_bias=0.0)).eval()
    torch.nn.init.normal_(search.gate.linear.weight, std=2.0)
    for t in search.embedding.tables:
        torch.nn.init.normal_(t.weight)
    models = [DLRM(vocab, field_dims=d).eval() for d in ([4, 0, 2], [1, 1, 1], [0, 4, 4])]
    centroids = torch.randn(3, 12)
    routed = RoutedModel(search, centroids, models).eval()
    x = torch.randint(0, 30, (400, 3), dtype=torch.int32)
    logits, clusters = routed.forward_with_clusters(x)
    assert torch.equal(clusters, nearest_centroid(search.masked_embedding(x)[0], centroids))
    assert len(torch.unique(clusters)) > 1
    with torch.no_grad():
        want = torch.stack([models[int(c)](x[i : i + 1])[0] for i, c in enumerate(clusters)])  # brute force
    torch.testing.assert_close(logits, want)
    # an empty cluster in a batch is fine
    one = x[clusters == clusters[0]][:7]
    torch.testing.assert_close(dispatch(one, routed.route(one), models), models[int(clusters[0])](one))


# ---- the stage ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    from ihas_lightning.stages import cluster, search

    root = tmp_path_factory.mktemp("retrain_stage")

    make = stage_cfg_factory(root)

    search.run(make("stage=search"))
    cluster.run(make("stage=cluster"))
    return make, root / "run"


def test_retrain_stage_models_and_resume(clustered, tmp_path):
    from ihas_lightning.stages import retrain

    make, run_dir = clustered
    # explicit input path, separate output dir
    cfg = make("stage=retrain", f"cluster.dir={run_dir / 'cluster'}", out=tmp_path / "r")
    metrics = retrain.run(cfg)
    info = json.loads((run_dir / "cluster" / "cluster.json").read_text())
    out = tmp_path / "r" / "retrain"
    summary = json.loads((out / "retrain.json").read_text())
    assert summary["k"] == info["k"] and (out / "manifest.json").is_file()
    mods = retrain.load_cluster_models(out, info["k"])
    for c, m in enumerate(mods):
        assert list(m.model.field_dims) == info["field_dims"][c]
        assert m.model.mlp.in_dim == sum(info["field_dims"][c])
        cm = json.loads((out / f"cluster_{c}" / "metrics.json").read_text())
        assert cm["samples"]["train"] == info["sizes"]["train"][c]
        assert f"retrain/cluster_{c}/params" in metrics
    # re-running into the same dir skips the finished clusters
    mtimes = [(out / f"cluster_{c}" / "best.ckpt").stat().st_mtime_ns for c in range(info["k"])]
    retrain.run(cfg)
    assert mtimes == [(out / f"cluster_{c}" / "best.ckpt").stat().st_mtime_ns for c in range(info["k"])]
    assert all(c["resumed"] for c in json.loads((out / "retrain.json").read_text())["clusters"])
    # a changed config retrains
    retrain.run(
        make(
            "stage=retrain", f"cluster.dir={run_dir / 'cluster'}", "retrain.init=scratch", out=tmp_path / "r"
        )
    )
    assert not any(c["resumed"] for c in json.loads((out / "retrain.json").read_text())["clusters"])


def test_retrain_searched_init_starts_from_search_tables(clustered, tmp_path):
    """retrain.init=searched: each kept dim starts as the searched table's column (real searched model)."""
    from ihas_lightning.rundir import load_search

    make, run_dir = clustered
    info = json.loads((run_dir / "cluster" / "cluster.json").read_text())
    searched = load_search(run_dir / "search" / "best.ckpt", None)
    vocab = info["vocab_sizes"]
    m = RetrainModule(
        vocab, MODEL | {"embed_dim": 16}, field_dims=info["field_dims"][0], kept_dims=info["kept_dims"][0]
    )
    m.init_from_searched(searched)
    for f, cols in enumerate(info["kept_dims"][0]):
        if cols:
            assert torch.equal(m.model.embedding.field_weight(f), searched.embedding.field_weight(f)[:, cols])


def test_retrain_missing_cluster_dir_is_one_line_error(clustered, tmp_path):
    from ihas_lightning.errors import DataError
    from ihas_lightning.stages import retrain

    make, _ = clustered
    with pytest.raises(DataError, match="cluster.json") as e:
        retrain.run(make("stage=retrain", f"cluster.dir={tmp_path / 'none'}", out=tmp_path / "r"))
    assert "\n" not in str(e.value)
