"""stage=predict: a finished run's model scores new rows (raw or prepared), as evaluate scored them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import FAST_FITS

TINY = [*FAST_FITS, "cluster.min_cluster_size=10"]


def _predict(cfg_factory, run: Path, inp, *extra: str) -> tuple[dict, dict]:
    from ihas_lightning import pipeline

    out = run / "predict" / "out.parquet"
    inp = f"[{','.join(str(i) for i in inp)}]" if isinstance(inp, list) else str(inp)
    cfg = cfg_factory("stage=predict", f"predict.run={run}", f"predict.input={inp}", f"predict.output={out}",
                      "predict.progress=false", *extra)  # fmt: skip
    pipeline.run_stage(cfg)
    return pq.read_table(out).to_pydict(), json.loads(out.with_suffix(".json").read_text())


def _final_row(run: Path) -> dict:
    res = json.loads((run / "evaluate" / "results.json").read_text())
    return next(r for r in res["rows"] if r["model"] == res["final_row"])


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    from conftest import stage_all

    return stage_all(tmp_path_factory.mktemp("predict_syn"), "dataset.rows=3000", *TINY)


def test_predict_on_the_prepared_test_split_equals_evaluate(cfg_factory, synthetic_run):
    """Every probability equals the routed model's own output on that split, and the AUC / logloss are
    evaluate's numbers."""
    from ihas_lightning.serving import load_run_config, load_run_models

    run, prepared = synthetic_run
    got, summary = _predict(cfg_factory, run, prepared / "test.parquet")
    rm = load_run_models(load_run_config(run))
    t = pq.read_table(prepared / "test.parquet")
    x = torch.from_numpy(np.stack([t.column(n).to_numpy() for n in rm.fmap.field_names], 1).astype(np.int32))
    with torch.inference_mode():
        logits, clusters = rm.routed.forward_with_clusters(x)
    assert np.array_equal(np.asarray(got["probability"], np.float32), torch.sigmoid(logits).numpy())
    assert got["cluster"] == clusters.tolist() and got["line"] == list(range(len(x)))
    assert got["label"] == t.column("label").to_pylist()
    row = _final_row(run)
    assert summary["model"] == "iHAS" and summary["routed"] and summary["rows"] == len(x)
    assert summary["auc"] == pytest.approx(row["test_auc"], abs=1e-9)
    assert summary["logloss"] == pytest.approx(row["test_logloss"], abs=1e-9)


def test_predict_base_and_search_models_of_the_run(cfg_factory, synthetic_run):
    run, prepared = synthetic_run
    res = json.loads((run / "evaluate" / "results.json").read_text())
    rows = {r["model"]: r for r in res["rows"]}
    for which, name in (("base", "Base"), ("search", "iHAS-1")):
        got, summary = _predict(cfg_factory, run, prepared / "test.parquet", f"predict.model={which}")
        assert summary["model"] == name and "cluster" not in got
        assert summary["auc"] == pytest.approx(rows[name]["test_auc"], abs=1e-9)


@pytest.mark.shared
def test_predict_raw_criteo_rows_round_trip(cfg_factory, criteo_raw, tmp_path):
    """Raw test rows in, probabilities out: equal to scoring the prepared test split (the same rows), with
    evaluate's AUC and logloss; the same rows without their label column give the same probabilities."""
    from ihas_lightning import pipeline

    run = tmp_path / "run"
    cfg = cfg_factory("stage=all", "dataset=criteo", "dataset.min_count=2",
                      *(f"dataset.{s}_path={p}" for s, p in criteo_raw.items()), *TINY, output_dir=run)  # fmt: skip
    pipeline.run(cfg)
    prepared = Path(str(cfg.dataset.prepared_dir))
    raw, s_raw = _predict(cfg_factory, run, criteo_raw["test"])
    enc, _ = _predict(cfg_factory, run, prepared / "test.parquet")
    assert raw["probability"] == enc["probability"] and raw["cluster"] == enc["cluster"]
    assert raw["line"][:3] == [1, 2, 3]  # the raw file's lines (no header)
    row = _final_row(run)
    assert s_raw["auc"] == pytest.approx(row["test_auc"], abs=1e-9)
    assert s_raw["logloss"] == pytest.approx(row["test_logloss"], abs=1e-9)
    # new traffic: no label column
    lines = criteo_raw["test"].read_text().splitlines()
    unlabeled = tmp_path / "new.txt"
    unlabeled.write_text("".join(ln.split("\t", 1)[1] + "\n" for ln in lines))
    new, s_new = _predict(cfg_factory, run, unlabeled)
    assert new["probability"] == raw["probability"] and set(new["label"]) == {None}
    assert "auc" not in s_new


@pytest.mark.shared
def test_predict_avazu_passes_the_id_through_and_names_a_missing_column(cfg_factory, avazu_raw, tmp_path):
    from ihas_lightning import pipeline
    from ihas_lightning.errors import DataError

    run = tmp_path / "run"
    cfg = cfg_factory("stage=all", "dataset=avazu", "dataset.min_count=2", "method=base",
                      *(f"dataset.{s}_path={p}" for s, p in avazu_raw.items()), *TINY, output_dir=run)  # fmt: skip
    pipeline.run(cfg)
    got, summary = _predict(cfg_factory, run, avazu_raw["test"])
    first = avazu_raw["test"].read_text().splitlines()
    data = [ln for ln in first if not ln.startswith("id,")]
    assert got["id"][:3] == [ln.split(",")[0] for ln in data[:3]]
    assert summary["model"] == "Base" and summary["auc"] == pytest.approx(
        _final_row(run)["test_auc"], abs=1e-9
    )
    header = "id,click,hour,C1,banner_pos,site_domain,site_category,app_id,app_domain,app_category,device_id," \
             "device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21"  # fmt: skip
    bad = tmp_path / "bad.csv"
    bad.write_text(header + "\n")
    with pytest.raises(DataError, match="missing column\\(s\\) site_id"):
        _predict(cfg_factory, run, bad)


def test_predict_errors_are_one_line(synthetic_run, tmp_path):
    run, prepared = synthetic_run
    base = [sys.executable, "-m", "ihas_lightning", "stage=predict", f"paths.log_dir={tmp_path}"]
    cases = [
        ([f"predict.input={prepared / 'test.parquet'}"], "error: config key 'predict.run'"),
        ([f"predict.run={tmp_path}", f"predict.input={prepared / 'test.parquet'}"], "not a run dir of stage=all"),
        ([f"predict.run={run}", f"predict.input={tmp_path / 'nope.txt'}"], "nope.txt: no such file"),
        ([f"predict.run={run}", f"predict.input={prepared / 'test.parquet'}", "predict.model=best"],
         "error: config key 'predict.model'"),
    ]  # fmt: skip
    for args, expected in cases:
        r = subprocess.run([*base, *args], capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and expected in r.stderr, (
            r.stderr
        )
    assert not (run / "predict" / "nope.parquet").exists()
