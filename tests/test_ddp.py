"""trainer=ddp: ``stage=all`` in 2 CPU processes (gloo, Lightning's launcher) equals one process.

The command runs as a user runs it (a subprocess: Lightning's launcher re-runs the command line for the
second rank). ~15 s, so it is in the default suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST_FITS

COMMON = [*FAST_FITS, "search.max_epochs=2", "retrain.max_epochs=2", "dataset.rows=4000", "logger=none",
          "trainer.enable_progress_bar=false", "prepare.progress=false"]  # fmt: skip


def _stage_all(tmp: Path, name: str, *extra: str) -> Path:
    run = tmp / name
    cmd = [sys.executable, "-m", "ihas_lightning", "stage=all", *COMMON, f"paths.data_dir={tmp / 'data'}",
           f"paths.output_dir={run}", *extra]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run


def _rows(run: Path) -> dict[str, tuple[float, float, float, float]]:
    res = json.loads((run / "evaluate" / "results.json").read_text())
    return {
        r["model"]: (r["val_auc"], r["val_logloss"], r["test_auc"], r["test_logloss"])
        for r in res["rows"]
        if r["model"] != "Constant"
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    one = _stage_all(tmp, "one")
    two = _stage_all(tmp, "two", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    return one, two


def test_two_processes_give_the_one_process_metrics(runs):
    one, two = runs
    a, b = _rows(one), _rows(two)
    assert set(a) == set(b) == {"Base", "iHAS-1", "iHAS (fast routing)", "iHAS"}
    for model in a:
        assert b[model] == pytest.approx(a[model], abs=1e-5), model


def test_every_training_sample_once_per_epoch(runs):
    one, two = runs
    for stage in ("base/search", "search"):
        m1 = json.loads((one / stage / "metrics.json").read_text())
        m2 = json.loads((two / stage / "metrics.json").read_text())
        assert m2["world_size"] == 2 and m2["epochs_run"] == m1["epochs_run"]
        # each rank trained on its half; together exactly the samples of one process (rows x epochs)
        assert m2["train_samples_all_ranks"] == m1["train_samples"]
        assert m2["train_samples"] < m1["train_samples"]
        assert m2["global_step"] == m1["global_step"]


def test_rank_zero_alone_writes_the_run_dir(runs):
    one, two = runs
    files = sorted(p.relative_to(two).as_posix() for p in two.rglob("*") if p.is_file())
    want = sorted(p.relative_to(one).as_posix() for p in one.rglob("*") if p.is_file())
    assert files == want  # the same outputs, no scratch or duplicate dirs left by rank 1
    assert not [f for f in files if ".scratch-" in f or ".tmp-" in f]
    status = json.loads((two / "pipeline.json").read_text())
    assert list(status["stages"]) == ["prepare", "base", "search", "cluster", "retrain", "evaluate"]
