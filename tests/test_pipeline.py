"""stage=all end to end (synthetic, Criteo and Avazu samples), stages run alone from explicit paths,
and a Hydra multirun smoke test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST_FITS

REPO = Path(__file__).resolve().parents[1]

TINY = [*FAST_FITS, "cluster.min_cluster_size=20", "cluster.batch_size=1024", "model.batch_size=512"]


def _check_run(out: Path, expect_base: bool = True) -> dict:
    res = json.loads((out / "evaluate" / "results.json").read_text())
    models = [r["model"] for r in res["rows"]]
    assert models == (
        ["Base", "iHAS-1", "iHAS (fast routing)", "iHAS"]
        if expect_base
        else ["iHAS-1", "iHAS (fast routing)", "iHAS"]
    ) + ["Constant"]
    for r in res["rows"][:-1]:
        assert (
            0.0 <= r["test_auc"] <= 1.0
            and 0.0 <= r["val_auc"] <= 1.0
            and r["test_logloss"] > 0
            and r["val_logloss"] > 0
            and r["params"] > 0
            and r["inference_ms"] > 0
        )
    assert res["routing_agrees_with_cluster_stage"] == 1.0
    assert sum(c["test_samples"] for c in res["per_cluster"]) == res["test_rows"]
    assert sum(c["val_samples"] for c in res["per_cluster"]) == res["val_rows"]
    md = (out / "evaluate" / "results.md").read_text()
    assert "| pooled |" in md and "Open dims per field" in md
    for d in ("search", "cluster", "retrain", "evaluate") + (("base/search",) if expect_base else ()):
        m = json.loads((out / d / "manifest.json").read_text())
        assert m["config_hash"], d
    # parents chain: evaluate -> retrain -> cluster -> search checkpoint
    ev = json.loads((out / "evaluate" / "manifest.json").read_text())["parents"]
    assert Path(ev["retrain_dir"]["path"]) == (out / "retrain").resolve()
    cl = json.loads((out / "cluster" / "manifest.json").read_text())["parents"]
    assert (
        Path(cl["search_ckpt"]["path"]) == (out / "search" / "best.ckpt").resolve()
        and cl["search_ckpt"]["sha256"]
    )
    assert (out / "evaluate" / "results.md").read_text().startswith("# iHAS results")
    return res


def test_stage_all_synthetic_and_resume(cfg_factory, tmp_path, capsys):
    from ihas_lightning import pipeline

    cfg = cfg_factory("stage=all", "dataset.rows=6000", *TINY)
    metrics = pipeline.run(cfg)
    out = Path(cfg.paths.output_dir)
    res = _check_run(out)
    assert "routed/test/auc" in metrics and "base/test/auc" in metrics
    assert "recovery" in res and len(res["recovery"]["per_group"]) == 2
    printed = capsys.readouterr().out
    assert "iHAS-1" in printed and "Recovery of the planted" in printed
    # re-running into the same run dir skips base, search, cluster and the retrained clusters
    ckpts = {p: p.stat().st_mtime_ns for p in out.rglob("best.ckpt")}
    pipeline.run(cfg)
    assert ckpts == {p: p.stat().st_mtime_ns for p in out.rglob("best.ckpt")}
    assert json.loads((out / "search" / "metrics.json").read_text()).get("resumed") is None  # file untouched

    # each later stage alone, from explicit paths, into fresh output dirs
    from ihas_lightning.stages import cluster, evaluate, retrain

    o2 = tmp_path / "alone"
    cluster.run(
        cfg_factory(
            "stage=cluster",
            "dataset.rows=6000",
            *TINY,
            f"search.ckpt={out / 'search' / 'best.ckpt'}",
            output_dir=o2,
        )
    )
    retrain.run(
        cfg_factory(
            "stage=retrain",
            "dataset.rows=6000",
            *TINY,
            f"cluster.dir={o2 / 'cluster'}",
            output_dir=tmp_path / "r3",
        )
    )
    m = evaluate.run(
        cfg_factory(
            "stage=evaluate",
            "dataset.rows=6000",
            *TINY,
            f"retrain.dir={tmp_path / 'r3' / 'retrain'}",
            output_dir=tmp_path / "e4",
        )
    )
    assert "routed/test/auc" in m and "base/test/auc" not in m  # no Base checkpoint in that run dir
    inputs = json.loads((tmp_path / "e4" / "evaluate" / "results.json").read_text())["inputs"]
    assert Path(inputs["cluster_dir"]) == (o2 / "cluster").resolve()  # found via the retrain manifest


def test_stage_all_takes_base_from_the_search_pretraining(cfg_factory):
    """Where the pretraining is Base's fit, stage=all fits it once: Base is written after the search."""
    from ihas_lightning import pipeline

    same = [
        "search.max_epochs=2",
        "search.pretrain.max_epochs=2",
        "search.patience=1",
        "search.pretrain.patience=1",
    ]
    cfg = cfg_factory("stage=all", "dataset.rows=6000", *TINY, *same)
    metrics = pipeline.run(cfg)
    out = Path(cfg.paths.output_dir)
    _check_run(out)
    base = json.loads((out / "base" / "search" / "metrics.json").read_text())
    assert base["derived_from"]["search"] == "../../search" and "base/test/auc" in metrics
    pre = json.loads((out / "search" / "pretraining.json").read_text())
    assert base["epochs_run"] == pre["epochs"] and base["best_epoch"] == pre["best_epoch"]
    stages = list(json.loads((out / "pipeline.json").read_text())["stages"])
    assert stages.index("base") == stages.index("search") + 1


def test_evaluate_missing_retrain_dir_is_one_line_error(cfg_factory, tmp_path):
    from ihas_lightning.errors import DataError
    from ihas_lightning.stages import evaluate

    with pytest.raises(DataError, match="retrain.json") as e:
        evaluate.run(cfg_factory("stage=evaluate", f"retrain.dir={tmp_path / 'x'}"))
    assert "\n" not in str(e.value)


def _raw_overrides(name: str, raw: dict[str, Path]) -> list[str]:
    return [f"dataset={name}", "dataset.min_count=2", *(f"dataset.{s}_path={p}" for s, p in raw.items())]


@pytest.mark.shared
def test_stage_all_criteo_sample(cfg_factory, criteo_raw):
    from ihas_lightning import pipeline

    cfg = cfg_factory(
        "stage=all", *_raw_overrides("criteo", criteo_raw), *TINY, "cluster.min_cluster_size=10"
    )
    pipeline.run(cfg)
    res = _check_run(Path(cfg.paths.output_dir))
    assert "recovery" not in res  # no planted truth on real data


@pytest.mark.shared
def test_stage_all_avazu_sample(cfg_factory, avazu_raw):
    from ihas_lightning import pipeline

    cfg = cfg_factory("stage=all", *_raw_overrides("avazu", avazu_raw), *TINY, "cluster.min_cluster_size=10")
    pipeline.run(cfg)
    _check_run(Path(cfg.paths.output_dir))


def test_hydra_multirun_makes_separate_run_dirs(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="1")
    cmd = [
        sys.executable, "-m", "ihas_lightning", "-m", "stage=search", "dataset=synthetic", "dataset.rows=3000",
        "seed=0,1", "trainer.fast_dev_run=true", "logger=csv", f"paths.log_dir={tmp_path}",
        f"paths.data_dir={tmp_path / 'data'}", "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = sorted(tmp_path.glob("multiruns/*/*/search/metrics.json"))
    assert len(metrics) == 2
    assert metrics[0].parent.parent != metrics[1].parent.parent
    seeds = {json.loads((m.parent / "manifest.json").read_text())["config"]["seed"] for m in metrics}
    assert seeds == {0, 1}


def test_reuse_is_verified_and_survives_a_move(cfg_factory, tmp_path, caplog):
    """An output is reused only when its files still match the manifest; a moved run dir is reused (the
    hashes are of content, not locations); a checkpoint of an unfinished stage is never an input."""
    import logging
    import shutil

    from ihas_lightning import pipeline
    from ihas_lightning.errors import DataError
    from ihas_lightning.stages import cluster

    out = tmp_path / "a"
    args = ("stage=all", "dataset.rows=2500", *TINY)
    pipeline.run(cfg_factory(*args, output_dir=out))
    man = json.loads((out / "search" / "manifest.json").read_text())
    assert man["outputs"]["best.ckpt"]["size"] == (out / "search" / "best.ckpt").stat().st_size

    moved = tmp_path / "moved"
    shutil.move(out, moved)
    stamps = {p: p.stat().st_mtime_ns for p in moved.rglob("best.ckpt")}
    pipeline.run(cfg_factory(*args, output_dir=moved))
    assert stamps == {p: p.stat().st_mtime_ns for p in moved.rglob("best.ckpt")}  # all reused

    # a corrupted checkpoint is not "up to date": that stage runs again, with one line saying why
    ckpt = moved / "search" / "best.ckpt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="ihas_lightning"):
        pipeline.run(cfg_factory(*args, output_dir=moved))
    assert any("content changed since it was written" in r.getMessage() for r in caplog.records)
    assert json.loads((moved / "search" / "manifest.json").read_text())["outputs"]["best.ckpt"]["sha256"] == (
        __import__("ihas_lightning.artifacts", fromlist=["x"]).file_digest(ckpt)
    )

    # a search dir without its manifest (killed before the end) is not an input
    (moved / "search" / "manifest.json").unlink()
    cfg = cfg_factory(
        "stage=cluster", "dataset.rows=2500", *TINY, f"search.ckpt={ckpt}", output_dir=tmp_path / "c"
    )
    with pytest.raises(DataError, match="not the output of a finished search"):
        cluster.run(cfg)


def _kill_fits_at(monkeypatch, when) -> None:
    """Every fit that selects checkpoints raises 'killed' at the end of an epoch where ``when(trainer,
    module)`` holds (after Lightning wrote that epoch's last.ckpt): a process killed mid-fit."""
    import lightning as L

    from ihas_lightning import training

    class Kill(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if when(trainer, pl_module):
                raise RuntimeError("killed")

    real = training.selection_callbacks

    def with_kill(*a, **k):
        cbs, ck = real(*a, **k)
        return [*cbs, Kill()], ck

    monkeypatch.setattr(training, "selection_callbacks", with_kill)


@pytest.mark.parametrize("method", ["base", "ihas"])
def test_a_killed_search_resumes_from_last_ckpt_with_the_same_result(
    cfg_factory, tmp_path, monkeypatch, method
):
    """Kill the fit at the end of epoch 3 (an exception from a callback), re-run stage=all into the same
    run dir: it continues from last.ckpt to the configured epochs and ends with the uninterrupted
    run's metrics. iHAS: epoch 3 is in the search phase (1 pretrain epoch), so the gate steps, their
    held-out batch stream and the Gumbel noise all continue where they stopped."""

    from ihas_lightning import pipeline

    args = ("stage=all", f"method={method}", "stage.train_base=false", "dataset.rows=2500", "search.max_epochs=4",
            "search.patience=null", "search.pretrain.max_epochs=1", "search.pretrain.patience=null",
            "method.early_stop=false", "model.batch_size=256", "evaluate.timing_repeats=1", "retrain.max_epochs=1")  # fmt: skip
    ref = tmp_path / "ref"
    pipeline.run(cfg_factory(*args, output_dir=ref))

    _kill_fits_at(monkeypatch, lambda trainer, module: trainer.current_epoch == 2)
    out = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="killed"):
        pipeline.run(cfg_factory(*args, output_dir=out))
    assert (out / "search" / "last.ckpt").is_file() and not (out / "search" / "manifest.json").exists()
    monkeypatch.undo()
    pipeline.run(cfg_factory(*args, output_dir=out))
    a = json.loads((ref / "search" / "metrics.json").read_text())
    b = json.loads((out / "search" / "metrics.json").read_text())
    # it continued (fewer samples trained in this process), for the same epochs and steps in total
    assert b["epochs_run"] == a["epochs_run"] and b["global_step"] == a["global_step"]
    assert b["train_samples"] < a["train_samples"]
    for k in ("val/auc", "val/logloss", "test/auc", "test/logloss"):
        assert b[k] == pytest.approx(a[k], abs=1e-6), k
    # and the resumed search counts as complete: the next run reuses it
    stamp = (out / "search" / "best.ckpt").stat().st_mtime_ns
    pipeline.run(cfg_factory(*args, output_dir=out))
    assert (out / "search" / "best.ckpt").stat().st_mtime_ns == stamp


def test_a_killed_retrain_resumes_the_cluster_it_was_fitting(cfg_factory, tmp_path, monkeypatch):
    """Kill the retrain of cluster 1 after its epoch 2 (cluster 0 finished): the re-run reuses cluster 0,
    continues cluster 1 from cluster_1.partial/last.ckpt, and ends with the uninterrupted run's metrics."""

    from ihas_lightning import pipeline
    from ihas_lightning.modules.retrain import RetrainModule

    args = ("stage=all", "method=ihas", "stage.train_base=false", "dataset.rows=2500", "cluster.k=2",
            "cluster.min_cluster_size=100", "search.max_epochs=2", "search.pretrain.max_epochs=1",
            "retrain.max_epochs=4", "retrain.patience=null", "model.batch_size=256", "evaluate.timing_repeats=1")  # fmt: skip
    ref = tmp_path / "ref"
    pipeline.run(cfg_factory(*args, output_dir=ref))

    _kill_fits_at(
        monkeypatch,
        lambda trainer, m: isinstance(m, RetrainModule) and m.cluster_id == 1 and trainer.current_epoch == 2,
    )
    out = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="killed"):
        pipeline.run(cfg_factory(*args, output_dir=out))
    partial = out / "retrain" / "cluster_1.partial"
    assert (partial / "last.ckpt").is_file() and not (out / "retrain" / "cluster_1").exists()
    monkeypatch.undo()
    pipeline.run(cfg_factory(*args, output_dir=out))
    assert not partial.exists()
    a = json.loads((ref / "retrain" / "retrain.json").read_text())["clusters"]
    b = json.loads((out / "retrain" / "retrain.json").read_text())["clusters"]
    assert b[0]["resumed"] is True and b[1]["resumed_from_epoch"] is not None
    assert b[1]["epochs_run"] == a[1]["epochs_run"]
    for k in ("val_auc", "val_logloss", "test_auc", "test_logloss"):
        assert b[1][k] == pytest.approx(a[1][k], abs=1e-6), k
