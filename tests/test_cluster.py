"""Clustering stage: nearest-centroid assignment, majority rule, small-cluster merge, the stage's outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import stage_cfg_factory
from ihas_lightning.errors import DataError
from ihas_lightning.models import DLRM
from ihas_lightning.routing import nearest_centroid
from ihas_lightning.stages.cluster import cluster_model, majority_dims, planted_recovery


def brute_argmin(emb: np.ndarray, cent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argmin, gap between the two smallest distances) by an explicit float64 distance table."""
    d = ((emb[:, None, :].astype(np.float64) - cent[None, :, :].astype(np.float64)) ** 2).sum(-1)
    s = np.sort(d, axis=1)
    gap = s[:, 1] - s[:, 0] if d.shape[1] > 1 else np.full(len(d), np.inf)
    return d.argmin(1), gap


def test_nearest_centroid_is_the_argmin_distance():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2000, 24, generator=g)
    cent = torch.randn(7, 24, generator=g)
    got = nearest_centroid(emb, cent).numpy()
    want, _ = brute_argmin(emb.numpy(), cent.numpy())
    assert (got == want).all()
    # masked embeddings are sparse (many exact zeros): still the nearest centroid
    emb = emb * (torch.rand(2000, 24, generator=g) > 0.6)
    got = nearest_centroid(emb, cent).numpy()
    want, _ = brute_argmin(emb.numpy(), cent.numpy())
    assert (got == want).all()
    with pytest.raises(ValueError):
        nearest_centroid(emb, cent[:, :5])


def test_majority_rule_and_all_closed_fallback():
    f, d = 3, 4
    mm = np.zeros((2, f * d))
    mm[0, [0, 1, 2, 9]] = [0.9, 0.5, 0.49, 0.7]  # field 0 keeps dims 0,1; field 2 keeps dim 1
    mm[1] = np.linspace(0.0, 0.4, f * d)  # nothing >= 0.5: fallback keeps the top d dims
    dims, kept, fallback = majority_dims(mm, f, d, 0.5)
    assert dims[0] == [2, 0, 1] and kept[0] == [[0, 1], [], [1]] and fallback[0] is False
    assert fallback[1] is True and sum(dims[1]) == d
    assert dims[1] == [0, 0, 4] and kept[1][2] == [0, 1, 2, 3]  # the 4 highest mean masks


def _batches(x: torch.Tensor, bs: int):
    return lambda: (x[i : i + bs] for i in range(0, len(x), bs))


def test_small_cluster_is_merged_and_assignment_is_nearest_centroid():
    torch.manual_seed(0)
    model = DLRM([50] * 4, embed_dim=4, gate=dict(tau=0.1, init_bias=0.0)).eval()
    torch.nn.init.normal_(model.gate.linear.weight, std=2.0)  # a gate that varies across samples
    x = torch.randint(0, 50, (3000, 4), dtype=torch.int32)
    res = cluster_model(
        model,
        _batches(x, 500),
        k=6,
        passes=2,
        batch_size=500,
        seed=0,
        min_cluster_size=700,
        keep_threshold=0.5,
    )
    k = res["centroids"].shape[0]
    counts = np.bincount(res["train_assign"], minlength=k)
    assert len(res["merges"]) >= 1 and k == 6 - len(res["merges"])
    assert (counts >= 700).all() or k == 1
    emb, mask = model.masked_embedding(x)
    want, gap = brute_argmin(emb.numpy(), res["centroids"].numpy())
    clear = gap > 1e-5
    assert (res["train_assign"][clear] == want[clear]).all()
    # the mean mask of each cluster is the average of its samples' masks
    for c in range(k):
        np.testing.assert_allclose(
            res["mean_mask"][c], mask[res["train_assign"] == c].double().mean(0).numpy()
        )


def test_kmeans_stops_at_the_pass_that_moves_the_centroids_less_than_tol():
    """cluster.tol: a pass whose relative squared centroid shift is at most tol ends the fit; tol 0 runs every
    pass; the shifts are those of the centroids between consecutive passes (checked against a rerun)."""
    from ihas_lightning.stages.cluster import fit_kmeans

    torch.manual_seed(0)
    model = DLRM([50] * 4, embed_dim=4, gate=dict(tau=0.1, init_bias=0.0)).eval()
    x = torch.randint(0, 50, (4000, 4), dtype=torch.int32)
    every: dict = {}
    c_all = fit_kmeans(model, _batches(x, 500), 3, 4, 500, 0, tol=0.0, info=every)
    assert every["passes"] == 4 and len(every["shifts"]) == 3 and all(s >= 0 for s in every["shifts"])
    tol = every["shifts"][0] * 1.0001  # the second pass moves no more than this: it ends the fit
    early: dict = {}
    c2 = fit_kmeans(model, _batches(x, 500), 3, 4, 500, 0, tol=tol, info=early)
    assert early["passes"] == 2 and early["shifts"] == every["shifts"][:1]
    two = fit_kmeans(model, _batches(x, 500), 3, 2, 500, 0)  # the same as max_passes=2
    np.testing.assert_array_equal(c2, two)
    assert not np.array_equal(c2, c_all)


def test_planted_recovery_scores_selected_fields():
    names = ["key", "f01", "f02", "f03", "f04"]
    truth = {"key_field": "key", "groups": {"0": ["f01", "f02"], "1": ["f03"]}}
    dims = [[16, 8, 4, 0, 0], [0, 0, 0, 3, 2]]
    assign = np.array([0, 0, 0, 1, 1, 1])
    group = np.array([0, 0, 1, 1, 1, 1])
    rec = planted_recovery(dims, names, assign, group, truth)
    c0, c1 = rec["per_cluster"]
    assert c0["group"] == 0 and c0["precision"] == 1.0 and c0["recall"] == 1.0 and c0["key_dims"] == 16
    assert c1["group"] == 1 and c1["precision"] == 0.5 and c1["recall"] == 1.0
    assert rec["per_group"][1]["cluster"] == 1 and abs(c0["purity"] - 2 / 3) < 1e-9


# ---- the stage on a small synthetic dataset -------------------------------------------------------------
@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A tiny search run: (cfg factory, run dir)."""
    from ihas_lightning.stages import search

    root = tmp_path_factory.mktemp("cluster_stage")

    make = stage_cfg_factory(root)

    search.run(make("stage=search"))
    return make, root / "run"


def test_cluster_stage_outputs(searched):
    from ihas_lightning.rundir import load_search, make_datamodule, prepared_dir
    from ihas_lightning.stages import cluster

    make, run_dir = searched
    cfg = make("stage=cluster")
    metrics = cluster.run(cfg)
    out = run_dir / "cluster"
    info = json.loads((out / "cluster.json").read_text())
    assert metrics["cluster/k"] == info["k"] >= 1
    for f in (
        "centroids.pt",
        "assign_train.npy",
        "assign_val.npy",
        "assign_test.npy",
        "dims_heatmap.png",
        "manifest.json",
    ):
        assert (out / f).is_file(), f
    tensors = torch.load(out / "centroids.pt", weights_only=True)  # tensors only, no pickled sklearn object
    assert set(tensors) == {"centroids", "mean_mask", "sizes"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parents"]["search_ckpt"]["path"].endswith("search/best.ckpt") and manifest["config_hash"]
    # every assignment is the nearest centroid of the sample's masked embedding
    prepared = prepared_dir(cfg)
    dm = make_datamodule(cfg, prepared, batch_size=512)
    model = load_search(run_dir / "search" / "best.ckpt", dm.feature_map)
    for split in ("train", "test"):
        x, _ = dm.split_arrays(split)
        emb, _ = model.masked_embedding(torch.as_tensor(x))
        want, gap = brute_argmin(emb.numpy(), tensors["centroids"].numpy())
        got = np.load(out / f"assign_{split}.npy")
        assert got.shape == (len(x),) and got.dtype == np.int32
        clear = gap > 1e-5
        assert (got[clear] == want[clear]).all()
    assert sum(info["sizes"]["train"]) == dm.feature_map.rows("train")
    assert all(len(d) == dm.feature_map.num_fields for d in info["field_dims"])
    assert "recovery" in info and len(info["recovery"]["per_cluster"]) == info["k"]
    # a re-run with the same config and search checkpoint reuses the output (manifest check)
    mtime = (out / "cluster.json").stat().st_mtime_ns
    cluster.run(cfg)
    assert (out / "cluster.json").stat().st_mtime_ns == mtime


def test_cluster_missing_checkpoint_is_one_line_error(searched, tmp_path):
    from ihas_lightning.stages import cluster

    make, _ = searched
    with pytest.raises(DataError, match="search checkpoint not found") as e:
        cluster.run(make("stage=cluster", f"search.ckpt={tmp_path / 'nope.ckpt'}", out=tmp_path / "r"))
    assert "\n" not in str(e.value)


def test_cluster_checkpoint_not_fitting_dataset(searched, tmp_path):
    from ihas_lightning.stages import cluster

    make, run_dir = searched
    ckpt = run_dir / "search" / "best.ckpt"
    cfg = make(
        "stage=cluster",
        f"search.ckpt={ckpt}",
        "dataset.num_fields=8",
        "dataset.rows=3000",
        out=tmp_path / "r",
    )
    with pytest.raises(DataError, match="fields") as e:
        cluster.run(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cinput", ["masked_embedding", "mask", "probs"])
def test_cluster_features_per_input(cinput):
    from ihas_lightning.routing import cluster_features

    torch.manual_seed(0)
    model = DLRM([20, 20, 20], embed_dim=4, gate=dict(tau=0.1, init_bias=0.0)).eval()
    torch.nn.init.normal_(model.gate.linear.weight, std=2.0)
    x = torch.randint(0, 20, (64, 3), dtype=torch.int32)
    feats, mask = cluster_features(model, x, cinput)
    emb, mask_ref = model.masked_embedding(x)
    assert torch.equal(mask, mask_ref) and feats.shape == emb.shape
    want = {"masked_embedding": emb, "mask": mask_ref, "probs": model.gate.probs(model.embed(x))}[cinput]
    torch.testing.assert_close(feats, want)
    with pytest.raises(ValueError, match="cluster input"):
        cluster_features(model, x, "nope")


def test_cluster_stage_on_masks_routes_like_the_stage(searched, tmp_path):
    from ihas_lightning.errors import ConfigError
    from ihas_lightning.stages import cluster

    make, run_dir = searched
    cluster.run(make("stage=cluster", "cluster.input=mask", f"search.ckpt={run_dir / 'search' / 'best.ckpt'}",
                     out=tmp_path / "m"))  # fmt: skip
    info = json.loads((tmp_path / "m" / "cluster" / "cluster.json").read_text())
    assert info["input"] == "mask"
    c = torch.load(tmp_path / "m" / "cluster" / "centroids.pt", weights_only=True)["centroids"]
    assert float(c.min()) >= 0.0 and float(c.max()) <= 1.0  # centroids of 0/1 masks
    with pytest.raises(ConfigError, match="'cluster.input'"):
        cluster.run(make("stage=cluster", "cluster.input=raw", out=tmp_path / "bad"))


def test_dims_heatmap_puts_many_fields_on_rows(tmp_path):
    """Figure 5 stays readable with Criteo's 39 fields: fields become rows (a tall image)."""
    from PIL import Image

    from ihas_lightning.report.heatmap import dims_heatmap

    names = [f"C{i}" for i in range(39)]
    tall = dims_heatmap([[i % 17 for i in range(39)], [16] * 39], names, tmp_path / "tall.png", sizes=[5, 6])
    wide = dims_heatmap([[1, 2, 3], [4, 5, 6]], names[:3], tmp_path / "wide.png")
    w, h = Image.open(tall).size
    assert h > w
    w, h = Image.open(wide).size
    assert w > h


@pytest.mark.parametrize("cinput", ["masked_embedding", "mask", "probs"])
def test_the_feature_stream_runs_the_gate_once_and_repeats_the_same_features(cinput):
    """Later passes rebuild the first pass's features from the masks kept as bits (the gate runs on
    the first pass only, except for probs)."""
    from ihas_lightning.routing import cluster_features
    from ihas_lightning.stages.cluster import FeatureStream

    torch.manual_seed(0)
    model = DLRM([30] * 5, embed_dim=3, gate=dict(tau=0.1, init_bias=0.0)).eval()  # 15 dims: not bytes
    torch.nn.init.normal_(model.gate.linear.weight, std=2.0)
    x = torch.randint(0, 30, (1000, 5), dtype=torch.int32)
    stream = FeatureStream(model, _batches(x, 300), cinput)
    want = [cluster_features(model, x[i : i + 300], cinput) for i in range(0, 1000, 300)]
    for _ in range(3):
        got = list(stream())
        assert len(got) == len(want)
        for (f, m), (wf, wm) in zip(got, want):
            assert torch.equal(f, wf) and torch.equal(m, wm) and not f.requires_grad
        assert all(torch.equal(m, wm) for m, (_, wm) in zip(stream.masks(), want))
    assert stream.gate_rows == (3000 if cinput == "probs" else 1000)
    changed = FeatureStream(model, _batches(x, 300), cinput)
    list(changed())
    changed.batches = _batches(x, 250)
    if cinput == "masked_embedding":
        with pytest.raises(RuntimeError, match="changed between passes"):
            list(changed())


def test_the_row_sample_gathers_the_rows_a_second_read_would(searched):
    """The router's rows gathered from the clustering's pass are the rows _rows_of reads."""
    from ihas_lightning.rundir import iter_split, make_datamodule, prepared_dir
    from ihas_lightning.stages.cluster import RowSample, _rows_of

    make, _ = searched
    cfg = make("stage=cluster")
    dm = make_datamodule(cfg, prepared_dir(cfg), batch_size=256)
    n = dm.num_rows("train")
    assign = np.random.default_rng(1).integers(0, 3, n).astype(np.int32)
    for max_rows in (50, n, 10 * n):
        sample = RowSample(n, max_rows, seed=7)
        for _ in range(2):  # a second pass is ignored
            for x, _ in iter_split(dm, "train", 256):
                sample.add(x)
        assert sample.complete
        xs, cs = sample.rows(assign, dm.feature_map.num_fields)
        xr, cr = _rows_of(dm, "train", assign, max_rows, 7, 256, dm.feature_map.num_fields)
        assert torch.equal(xs, xr) and torch.equal(cs, cr)
        assert len(cs) == n if max_rows >= n else 0 < len(cs) < n
    short = RowSample(n + 1, 10, seed=0)
    for x, _ in iter_split(dm, "train", 256):
        short.add(x)
    assert not short.complete
    with pytest.raises(RuntimeError, match="no whole pass"):
        short.rows(assign, dm.feature_map.num_fields)
