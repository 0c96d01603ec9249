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
    # iHAS's retrain guard needs a Base: this output dir has none, so the search's gates-open pretrained
    # model (Base's budget and seed) is its Base
    g = summary["guard"]
    assert g["mode"] == "base" and g["skipped"] is None and g["base_source"].startswith("search pretrained")
    assert g["base_ckpt"] == str((run_dir / "search" / "pretrained.ckpt").resolve())
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


@pytest.mark.parametrize("key", ["retrain.guard", "method.retrain_guard"])
def test_retrain_guard_bad_value_is_one_line_config_error(clustered, tmp_path, key):
    from ihas_lightning.errors import ConfigError
    from ihas_lightning.stages import retrain

    make, _ = clustered
    with pytest.raises(ConfigError, match=f"'{key}'.*base.*none") as e:
        retrain.run(make("stage=retrain", f"{key}=basee", out=tmp_path / "r"))
    assert "\n" not in str(e.value)


def test_retrain_missing_cluster_dir_is_one_line_error(clustered, tmp_path):
    from ihas_lightning.errors import DataError
    from ihas_lightning.stages import retrain

    make, _ = clustered
    with pytest.raises(DataError, match="cluster.json") as e:
        retrain.run(make("stage=retrain", f"cluster.dir={tmp_path / 'none'}", out=tmp_path / "r"))
    assert "\n" not in str(e.value)


# ---- the retrain guard: no cluster model worse than Base on its cluster's validation rows ---------------
def _rows(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[loss, logit, label] rows, as CTRModule.keep_val_rows collects them."""
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return torch.stack([loss, logits, y], 1).double()


def test_guard_verdict_falls_back_on_a_worse_model_and_keeps_an_equal_or_better_one():
    from ihas_lightning.modules.selection import guard_verdict
    from ihas_lightning.schedule import base_rate_entropy

    g = torch.Generator().manual_seed(0)
    n = 6000
    signal = torch.randn(n, generator=g)
    y = (torch.rand(n, generator=g) < torch.sigmoid(2.0 * signal - 1.5)).float()
    h0 = base_rate_entropy(float(y.mean()))
    tol = dict(tol_ne=0.002, tol_auc=0.001, h0=h0, confidence=0.95)
    base = _rows(1.0 * signal - 1.5 + 0.3 * torch.randn(n, generator=g), y)
    worse = _rows(0.3 * signal - 1.5 + 1.0 * torch.randn(n, generator=g), y)
    better = _rows(2.0 * signal - 1.5, y)
    v = guard_verdict(worse, base, **tol)
    assert not v["admissible"] and v["excess_upper"] > 0.002 * h0 and v["auc_lower"] < -0.001
    assert v["model"]["val_auc"] < v["base"]["val_auc"] and v["reason"].startswith("not within")
    same = guard_verdict(base.clone(), base, **tol)
    assert same["admissible"] and same["excess_upper"] == 0.0 and same["auc_lower"] == 0.0
    assert same["reason"] is None
    up = guard_verdict(better, base, **tol)
    assert up["admissible"] and up["excess_upper"] < 0 and up["auc_lower"] > 0
    # the stage's default compares the means: a model better on a small cluster's validation rows is
    # kept, where the 0.95 bounds (too wide on 300 rows) would refuse it; a worse one falls back either way
    small = slice(0, 300)
    noise = torch.randn(n, generator=torch.Generator().manual_seed(0))
    slightly = _rows(1.5 * signal - 1.5 + 0.25 * noise, y)
    assert guard_verdict(slightly[small], base[small], **{**tol, "confidence": 0.0})["admissible"]
    assert not guard_verdict(slightly[small], base[small], **tol)["admissible"]
    assert not guard_verdict(worse, base, **{**tol, "confidence": 0.0})["admissible"]
    # nothing to judge by: the cluster falls back
    none = guard_verdict(None, None, **tol)
    assert not none["admissible"] and none["reason"] == "no validation rows"
    neg = torch.zeros(50)
    one_class = guard_verdict(_rows(torch.randn(50), neg), _rows(torch.randn(50), neg), **tol)
    assert not one_class["admissible"] and "class" in one_class["reason"]


@pytest.mark.parametrize("backbone", ["mlp", "deepfm", "dcn"])
def test_from_base_is_base_at_full_dims(backbone):
    """The guard's fallback: a RetrainModule (full dims) with Base's weights gives Base's logits exactly."""
    from ihas_lightning.modules.ctr import CTRModule

    torch.manual_seed(0)
    cfg = MODEL | {"backbone": backbone}
    base = CTRModule([10, 20, 30], cfg).model.eval()
    for p in base.parameters():
        torch.nn.init.normal_(p.data)
    m = RetrainModule.from_base(base, cfg, cluster_id=1).eval()
    assert m.fallback == "base" and list(m.model.field_dims) == [4, 4, 4] and m.cluster_id == 1
    x = torch.randint(0, 10, (64, 3))
    with torch.no_grad():
        assert torch.equal(m.model(x), base(x))
    with pytest.raises(ValueError, match="plain model"):
        RetrainModule.from_base(DLRM([10, 20, 30], embed_dim=4, gate=dict(tau=0.1)), MODEL)


@pytest.fixture(scope="module")
def with_base(clustered):
    """The clustered run plus its Base (``<run>/base``, as stage=all trains it)."""
    from ihas_lightning import pipeline
    from ihas_lightning.stages import search

    make, run_dir = clustered
    search.run(pipeline.base_config(make("stage=search")))
    return make, run_dir, run_dir / "base" / "search" / "best.ckpt"


def test_retrain_guard_records_its_verdict_and_falls_back_to_base(with_base, tmp_path, monkeypatch, caplog):
    """The guard's verdict and bounds in every cluster's metrics.json; a cluster that falls back holds a
    checkpoint that load_cluster_models reads and that gives exactly Base's logits on its rows."""
    import numpy as np

    from ihas_lightning.modules import selection
    from ihas_lightning.rundir import load_search_model, make_datamodule, split_tensors
    from ihas_lightning.stages import retrain

    make, run_dir, base_ckpt = with_base
    args = ("stage=retrain", f"cluster.dir={run_dir / 'cluster'}", f"evaluate.base_ckpt={base_ckpt}")
    retrain.run(make(*args, out=tmp_path / "kept"))
    k = json.loads((run_dir / "cluster" / "cluster.json").read_text())["k"]
    for c in range(k):
        m = json.loads((tmp_path / "kept" / "retrain" / f"cluster_{c}" / "metrics.json").read_text())
        g = m["guard"]
        assert g["mode"] == "base" and isinstance(g["admissible"], bool) and g["base"]["val_rows"] > 0
        assert (m["fallback"] == "base") == (not g["admissible"])
    # force every cluster to fall back
    real = selection.guard_verdict
    monkeypatch.setattr(selection, "guard_verdict", lambda *a, **kw: {**real(*a, **kw), "admissible": False})
    out = tmp_path / "fell" / "retrain"
    caplog.clear()
    with caplog.at_level("WARNING", logger="ihas_lightning"):
        retrain.run(make(*args, out=tmp_path / "fell"))
    assert sum("falls back to Base" in r.getMessage() for r in caplog.records) == k
    summary = json.loads((out / "retrain.json").read_text())["guard"]
    assert summary["fallbacks"] == k and summary["fallback_clusters"] == list(range(k))
    base = load_search_model(base_ckpt).model.eval()
    info = json.loads((run_dir / "cluster" / "cluster.json").read_text())
    assign = np.load(run_dir / "cluster" / "assign_val.npy")
    x, _ = split_tensors(make_datamodule(make(*args), info["prepared_dir"], batch_size=512), "val")
    for c, mod in enumerate(retrain.load_cluster_models(out, k)):
        m = json.loads((out / f"cluster_{c}" / "metrics.json").read_text())
        assert (
            m["fallback"] == "base"
            and mod.fallback == "base"
            and m["retrained"]["field_dims"] == info["field_dims"][c]
        )
        assert m["val_auc"] == m["guard"]["base"]["val_auc"] and m["params"] == base.num_parameters()
        rows = torch.from_numpy(assign == c)
        with torch.no_grad():
            assert torch.equal(mod.model(x[rows]), base(x[rows]))
    # stage=evaluate serves the fallbacks: the routed iHAS is Base on every row, and says why
    from ihas_lightning.report.tables import results_markdown
    from ihas_lightning.stages import evaluate

    evaluate.run(make("stage=evaluate", f"retrain.dir={out}", f"evaluate.base_ckpt={base_ckpt}", "evaluate.timing_rows=512",
                      "evaluate.timing_repeats=1", "evaluate.permutations=5", out=tmp_path / "fell"))  # fmt: skip
    res = json.loads((tmp_path / "fell" / "evaluate" / "results.json").read_text())
    rows = {r["model"]: r for r in res["rows"]}
    for split in ("val", "test"):
        assert rows["iHAS"][f"{split}_auc"] == pytest.approx(rows["Base"][f"{split}_auc"], abs=1e-9)
    assert res["retrain_guard"] == {"mode": "base", "skipped": None, "clusters": k, "fallbacks": k,
                                    "fallback_clusters": list(range(k))}  # fmt: skip
    assert all(c["fallback"] == "base" and c["guard"]["admissible"] is False for c in res["per_cluster"])
    assert f"{k} of {k} cluster models fell back to Base" in results_markdown(res)


def test_the_routed_model_as_a_whole_is_guarded_too(with_base, tmp_path, monkeypatch, caplog):
    """Every cluster passes on its own rows, but the routed model on all validation rows does not: every
    cluster then serves Base's model, the verdict is recorded, and the routed iHAS is Base."""
    from ihas_lightning.modules import selection
    from ihas_lightning.stages import evaluate, retrain

    make, run_dir, base_ckpt = with_base
    info = json.loads((run_dir / "cluster" / "cluster.json").read_text())
    k, n_val = info["k"], sum(info["sizes"]["val"])
    real = selection.guard_verdict

    def verdict(rows, *a, **kw):  # each cluster admissible; the pooled rows (all of val) are not
        return {**real(rows, *a, **kw), "admissible": rows is None or len(rows) != n_val}

    monkeypatch.setattr(selection, "guard_verdict", verdict)
    args = ("stage=retrain", f"cluster.dir={run_dir / 'cluster'}", f"evaluate.base_ckpt={base_ckpt}")
    with caplog.at_level("WARNING", logger="ihas_lightning"):
        retrain.run(make(*args, out=tmp_path / "p"))
    assert sum("as a whole" in r.getMessage() for r in caplog.records) == 1
    out = tmp_path / "p" / "retrain"
    g = json.loads((out / "retrain.json").read_text())["guard"]
    assert g["pooled"]["admissible"] is False and g["pooled"]["model"]["val_rows"] == n_val
    for c in range(k):
        m = json.loads((out / f"cluster_{c}" / "metrics.json").read_text())
        assert m["fallback"] == "base" and m["fallback_reason"] == "pooled" and m["guard"]["admissible"]
    evaluate.run(make("stage=evaluate", f"retrain.dir={out}", f"evaluate.base_ckpt={base_ckpt}", "evaluate.timing_rows=512",
                      "evaluate.timing_repeats=1", "evaluate.permutations=5", out=tmp_path / "p"))  # fmt: skip
    rows = {
        r["model"]: r for r in json.loads((tmp_path / "p" / "evaluate" / "results.json").read_text())["rows"]
    }
    assert rows["iHAS"]["val_auc"] == pytest.approx(rows["Base"]["val_auc"], abs=1e-9)
    # a re-run finds every cluster up to date (the rewritten dirs keep their manifests) and Base-served
    retrain.run(make(*args, out=tmp_path / "p"))
    assert all(c["resumed"] for c in json.loads((out / "retrain.json").read_text())["clusters"])
