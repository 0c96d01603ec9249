"""W&B (offline): stage=all logs one run holding the stage metrics, the dims heatmap and the results table."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import FAST_FITS

TINY = [*FAST_FITS, "dataset.rows=4000", "cluster.min_cluster_size=20", "model.batch_size=512"]


def test_stage_all_wandb_offline_run_holds_logged_keys(cfg_factory, monkeypatch):
    from ihas_lightning import pipeline

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = cfg_factory("stage=all", "logger=wandb", "logger.wandb.mode=offline", *TINY)
    pipeline.run(cfg)
    out = Path(cfg.paths.output_dir)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # one W&B run for the whole job
    # offline runs keep the history in the .wandb record log (protobuf records hold the keys verbatim)
    records = list(runs[0].glob("*.wandb"))
    assert len(records) == 1
    blob = records[0].read_bytes()
    for key in ("base/test/auc", "ihas1/test/auc", "routed/test/auc", "routed/inference_ms", "cluster/k",
                "recovery/min_f1", "search/val/auc", "base/val/auc", "retrain/cluster_0/val/auc",
                "cluster/dims_heatmap", "evaluate/results", "gate/p_hist"):  # fmt: skip
        assert key.encode() in blob, key
    media = runs[0] / "files" / "media"
    assert list(media.glob("images/cluster/dims_heatmap_*.png"))  # the Figure 5 heatmap as wandb.Image
    assert list(media.glob("table/evaluate/results_*.table.json"))  # the results as wandb.Table
    summary = runs[0] / "files" / "wandb-summary.json"  # written by some wandb versions in offline mode
    if summary.is_file():
        assert "routed/test/auc" in json.loads(summary.read_text())
    import wandb

    assert wandb.run is None  # finished in the finally
    assert os.environ["WANDB_MODE"] == "offline"


def test_sweep_report_logs_its_tables_and_figures_to_one_offline_run_in_the_group(tmp_path, monkeypatch):
    import numpy as np
    from omegaconf import OmegaConf

    from ihas_lightning.report.callback import MultirunReport
    from test_report import _fake_job

    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = tmp_path / "sweep"
    rng = np.random.default_rng(0)
    y = (rng.random(200) < 0.3).astype(np.int8)
    het = {"statistic": 0.5, "trained_statistic": 0.5, "null_mean": 0.0, "null_q95": 0.0, "p_value": 1 / 201,
           "permutations": 200, "rows": 200}  # fmt: skip
    for seed in (0, 1):
        _fake_job(sweep, f"{seed}a", "ihas", seed, 0.8, y=y, logits=rng.random(200).astype(np.float32), het=het,
                  served="exact")  # fmt: skip
        _fake_job(sweep, f"{seed}b", "ihas_2", seed, 0.7, y=y, logits=rng.random(200).astype(np.float32))
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "report": {"table": "auto"},
                            "paths": {"output_dir": str(sweep)},
                            "logger": {"name": "wandb", "wandb": {"mode": "offline", "project": "p",
                                                                  "group": "table4-toy", "save_dir": str(sweep)}}})  # fmt: skip
    MultirunReport().on_multirun_end(cfg)
    runs = sorted((sweep / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # one W&B run for the sweep's report
    blob = next(runs[0].glob("*.wandb")).read_bytes()
    for key in ("table4/toy", "table4/toy/heterogeneity", "table4-toy", "report-sweep"):
        assert key.encode() in blob, key
    assert list((runs[0] / "files" / "media").glob("table/table4/toy_*.table.json"))
    import wandb

    assert wandb.run is None
