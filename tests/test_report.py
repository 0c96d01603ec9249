"""Table 2 / Figure 4: the experiment=table2 multirun writes the report; stage=report re-writes it and
lists missing runs by name; the paired differences equal a hand computation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ihas_lightning.report.table2 import summarize

TINY = ["dataset.rows=4000", "search.max_epochs=1", "search.pretrain.max_epochs=1", "search.pretrain.patience=null",
        "search.search_every=2", "retrain.max_epochs=1", "cluster.min_cluster_size=50", "model.batch_size=512",
        "method.max_epochs=2"]  # fmt: skip


def _cli(*args, tmp_path):
    return subprocess.run(
        [sys.executable, "-m", "ihas_lightning", *args, "logger=none", "trainer.enable_progress_bar=false",
         f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}"],
        capture_output=True, text=True, env={**__import__("os").environ, "WANDB_MODE": "offline"},
    )  # fmt: skip


PEP_TINY = """defaults:
  - pep
  - _self_
# PEP with a budget that 4k rows x 2 epochs reach (the test's only change to the method)
selector:
  s_init: -4.0
  budgets: [0.9]
  retrain_budget: 0.9
"""


def test_table2_multirun_of_every_method_writes_the_report(tmp_path):
    sweep = tmp_path / "sweep"
    extra = tmp_path / "extra_conf"
    (extra / "method").mkdir(parents=True)
    (extra / "method" / "pep_tiny.yaml").write_text(PEP_TINY)
    methods = ",".join(
        ["base", "ihas", "pep_tiny", "autofield", "optembed", "adafs_soft", "adafs_hard", "optfs", "pep"]
    )
    r = _cli("-m", "experiment=table2", "dataset=synthetic", *TINY, "seed=0", f"hydra.sweep.dir={sweep}",
             f"hydra.searchpath=[file://{extra}]", f"method={methods}", tmp_path=tmp_path)  # fmt: skip
    # the plain pep job cannot reach its budgets on 4k rows: listed as failed, the sweep goes on, exit 2
    assert r.returncode == 2, r.stderr[-3000:]
    rep = json.loads((sweep / "report" / "report.json").read_text())
    summary = rep["datasets"]["synthetic"]["summary"]
    assert [s["method"] for s in summary] == [
        "base", "ihas", "pep", "autofield", "optembed", "adafs_soft", "adafs_hard", "optfs"
    ]  # fmt: skip
    md = (sweep / "report" / "table2_synthetic.md").read_text()
    assert "| iHAS | 1 |" in md and "| PEP | 1 |" in md and "AUC - iHAS" in md
    assert (sweep / "report" / "table2_synthetic.csv").read_text().count("\n") == 1 + len(summary)
    assert (sweep / "report" / "figure4_synthetic.png").stat().st_size > 1000
    (failed,) = rep["missing"]
    assert failed["method"] == "pep" and "never reached the budget" in failed["reason"]

    # a failed job is listed by name, never dropped silently
    victim = next(p for p in sweep.iterdir() if (p / ".hydra").is_dir() and "method=optfs" in
                  (p / ".hydra" / "overrides.yaml").read_text())  # fmt: skip
    (victim / "evaluate" / "results.json").unlink()
    out = tmp_path / "again"
    r = _cli("stage=report", f"report.dir={sweep}", f"report.out={out}", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (out / "table2_synthetic.md").read_text()
    assert "## Missing or failed runs" in md and str(victim) in md and "| OptFS |" not in md


def test_report_of_a_dir_without_runs_is_a_one_line_error(tmp_path):
    r = _cli("stage=report", f"report.dir={tmp_path}", tmp_path=tmp_path)
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "no stage=all job dirs" in err[0]


def test_paired_differences_from_ihas_match_a_hand_computation():
    def run(method, seed, auc, ll):
        return {"method": method, "display": method, "row": method, "seed": seed, "test_auc": auc,
                "test_logloss": ll, "embedding_params": 10, "dense_params": 5, "inference_ms": 1.0,
                "wall_seconds": 2.0}  # fmt: skip

    runs = [run("ihas", 0, 0.80, 0.45), run("ihas", 1, 0.81, 0.44), run("ihas", 2, 0.79, 0.46),
            run("pep", 0, 0.78, 0.47), run("pep", 1, 0.80, 0.45), run("pep", 2, 0.77, 0.48)]  # fmt: skip
    s = {r["method"]: r for r in summarize(runs)}
    d = s["pep"]["test_auc_minus_ihas"]
    diffs = [-0.02, -0.01, -0.02]
    assert d["mean"] == pytest.approx(sum(diffs) / 3)
    sd = (sum((x - d["mean"]) ** 2 for x in diffs) / 2) ** 0.5
    half = 4.302652729911275 * sd / 3**0.5  # t(0.975, 2)
    assert d["ci"] == pytest.approx([d["mean"] - half, d["mean"] + half])
    assert d["verdict"] == "lose" and s["pep"]["test_logloss_minus_ihas"]["verdict"] == "lose"
    assert "test_auc_minus_ihas" not in s["ihas"]
