"""Backbones in every phase, transfer of frozen selectors (paper RQ2), the ablation methods (RQ3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import FAST_FITS
from ihas_lightning.models.backbones import BACKBONES

TINY = [
    *FAST_FITS,
    "dataset.rows=2500",
    "cluster.min_cluster_size=20",
    "cluster.batch_size=1024",
    "model.batch_size=512",
    "method.max_epochs=1",
]


def _rows(out: Path) -> dict:
    res = json.loads((out / "evaluate" / "results.json").read_text())
    return {r["model"]: r for r in res["rows"]} | {"_res": res}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_runs_base_and_ihas_end_to_end(cfg_factory, tmp_path, backbone):
    """The smoke test: stage=all trains Base, searches, clusters, retrains and routes with each backbone."""
    from ihas_lightning import pipeline
    from ihas_lightning.rundir import load_cluster_models, load_search_model

    out = tmp_path / backbone
    cfg = cfg_factory("stage=all", f"backbone={backbone}", *TINY, output_dir=out)
    pipeline.run(cfg)
    rows = _rows(out)
    assert {"Base", "iHAS-1", "iHAS", "Constant"} <= set(rows)
    assert rows["_res"]["backbone"] == backbone
    for name in ("Base", "iHAS-1", "iHAS"):
        assert 0.0 <= rows[name]["test_auc"] <= 1.0 and rows[name]["test_logloss"] > 0
    for ckpt in (out / "base" / "search" / "best.ckpt", out / "search" / "best.ckpt"):
        assert load_search_model(ckpt).model.backbone_name == backbone
    info = json.loads((out / "cluster" / "cluster.json").read_text())
    for c, m in enumerate(load_cluster_models(out / "retrain", info["k"])):
        assert m.model.backbone_name == backbone
        assert list(m.model.field_dims) == info["field_dims"][c]
        # each kept dim at its original position
        assert m.model.positions == info["kept_dims"][c]


def test_transfer_of_frozen_selectors_to_another_backbone(cfg_factory, tmp_path):
    from ihas_lightning import pipeline
    from ihas_lightning.rundir import load_cluster_models, load_search_model

    # the MLP sources: iHAS and AdaFS-soft searches
    src = {}
    for m in ("ihas", "adafs_soft"):
        src[m] = tmp_path / f"src_{m}"
        pipeline.run(
            cfg_factory("stage=all", f"method={m}", "stage.train_base=false", *TINY, output_dir=src[m])
        )

    # iHAS: no search of its own; cluster reads the source's gates; retrain builds DeepFM
    out = tmp_path / "deepfm_ihas"
    cfg = cfg_factory("stage=all", "backbone=deepfm", f"transfer.from={src['ihas']}", *TINY, output_dir=out)
    pipeline.run(cfg)
    assert not (out / "search").exists()
    parents = json.loads((out / "cluster" / "manifest.json").read_text())["parents"]
    assert Path(parents["search_ckpt"]["path"]) == (src["ihas"] / "search" / "best.ckpt").resolve()
    rows = _rows(out)
    assert list(rows)[:-1] == [
        "Base",
        "iHAS (fast routing)",
        "iHAS",
        "Constant",
    ]  # no search row: the source is an MLP
    assert rows["_res"]["transfer_from"] == str(src["ihas"])
    info = json.loads((out / "cluster" / "cluster.json").read_text())
    assert all(m.model.backbone_name == "deepfm" for m in load_cluster_models(out / "retrain", info["k"]))
    assert load_search_model(out / "base" / "search" / "best.ckpt").model.backbone_name == "deepfm"

    # AdaFS-soft: trains FM with the source's embedding and its frozen controller
    out = tmp_path / "fm_adafs"
    cfg = cfg_factory("stage=all", "method=adafs_soft", "backbone=fm", "stage.train_base=false",
                      f"transfer.from={src['adafs_soft']}", *TINY, output_dir=out)  # fmt: skip
    pipeline.run(cfg)
    source = load_search_model(src["adafs_soft"] / "search" / "best.ckpt").model
    model = load_search_model(out / "search" / "best.ckpt").model
    assert model.backbone_name == "fm" and model.selector.frozen and not model.selector.training
    for k, v in source.selector.state_dict().items():
        assert torch.equal(v, model.selector.state_dict()[k]), f"the frozen controller moved: {k}"
    assert not torch.equal(source.embedding.tables[0].weight, model.embedding.tables[0].weight)  # trained on
    metrics = json.loads((out / "search" / "metrics.json").read_text())
    assert metrics["transfer"]["source_backbone"] == "mlp" and metrics["pretrain_epochs"] == 0
    assert list(_rows(out))[:-1] == ["AdaFS-soft", "Constant"]


def test_transfer_errors_are_one_line(cfg_factory, tmp_path):
    from ihas_lightning import pipeline
    from ihas_lightning.errors import ConfigError, DataError

    with pytest.raises(DataError, match="no search checkpoint in transfer.from"):
        pipeline.run(cfg_factory("stage=all", f"transfer.from={tmp_path / 'nowhere'}", *TINY))
    with pytest.raises(ConfigError, match="retrain.init"):
        pipeline.run(cfg_factory("stage=all", f"transfer.from={tmp_path}", "retrain.init=continue", *TINY))
    # a source searched on other data (another vocabulary) does not fit
    src = tmp_path / "src"
    pipeline.run(
        cfg_factory("stage=all", "method=adafs_soft", "stage.train_base=false", *TINY, output_dir=src)
    )
    cfg = cfg_factory("stage=all", "method=adafs_soft", "stage.train_base=false", "dataset.rows=3000",
                      f"transfer.from={src}", *(o for o in TINY if not o.startswith("dataset.rows")),
                      output_dir=tmp_path / "other")  # fmt: skip
    with pytest.raises(DataError, match="in the checkpoint but"):
        pipeline.run(cfg)


def test_transfer_search_if_missing_searches_the_source_once(cfg_factory, tmp_path):
    from ihas_lightning import pipeline

    src = tmp_path / "src"
    args = (
        "stage=all",
        "stage.train_base=false",
        f"transfer.from={src}",
        "transfer.search_if_missing=true",
        *TINY,
    )
    pipeline.run(cfg_factory(*args, "backbone=fm", output_dir=tmp_path / "a"))
    ckpt = src / "search" / "best.ckpt"
    assert load_backbone(ckpt) == "mlp"
    stamp = ckpt.stat().st_mtime_ns
    pipeline.run(cfg_factory(*args, "backbone=wide_deep", output_dir=tmp_path / "b"))
    assert ckpt.stat().st_mtime_ns == stamp  # reused, not searched again


def load_backbone(ckpt: Path) -> str:
    from ihas_lightning.rundir import load_search_model

    return load_search_model(ckpt).model.backbone_name


def test_ablation_methods(cfg_factory, tmp_path):
    from ihas_lightning import pipeline

    for m, key, value in (("ihas_3", "polarization", False), ("ihas_4", "instance_wise", False)):
        cfg = cfg_factory(f"method={m}")
        assert cfg.method.selector[key] is value and cfg.method.display == m.replace("ihas_", "iHAS-")
    out = tmp_path / "ihas2"
    pipeline.run(cfg_factory("stage=all", "method=ihas_2", "stage.train_base=false", *TINY, output_dir=out))
    info = json.loads((out / "cluster" / "cluster.json").read_text())
    assert info["k"] == 1 and info["k_requested"] == 1 and info["sizes"]["train"][0] > 0
    rows = _rows(out)
    assert list(rows)[:-1] == ["iHAS-1", "iHAS-2", "Constant"]
    assert "routing_params" not in rows["_res"]  # one model for all samples: no routing
