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
    assert "## Missing or failed runs" in md and f"`{victim.name}`" in md and "| OptFS |" not in md
    assert str(tmp_path) not in md  # the sweep is named relatively, never by a machine path


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


def test_table2_counts_the_retrain_guards_fallbacks_by_seed():
    from ihas_lightning.report.table2 import guard_note

    def run(seed, guard):
        return {"method": "ihas", "display": "iHAS", "row": "iHAS", "seed": seed, "test_auc": 0.8,
                "test_logloss": 0.4, "embedding_params": 1, "dense_params": 1, "inference_ms": 1.0,
                "wall_seconds": 1.0, "retrain_guard": guard}  # fmt: skip

    g = {"mode": "base", "skipped": None, "clusters": 2}
    runs = [run(0, {**g, "fallbacks": 2}), run(1, {**g, "fallbacks": 0}), run(2, None),
            run(3, {**g, "fallbacks": 0, "skipped": "no Base model"})]  # fmt: skip
    (line,) = guard_note(summarize(runs))
    assert (
        line
        == "* iHAS: 2 of 4 cluster models fell back to Base (seed 0: 2/2, seed 1: 0/2, seed 3: skipped (no Base))."
    )


@pytest.mark.slow  # 18 s; Tables 2 and 3 run the same multirun + callback path in the default suite
def test_table4_multirun_writes_the_ablation_table_and_figures(tmp_path):
    sweep = tmp_path / "t4"
    r = _cli("-m", "experiment=table4", "dataset=synthetic", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}",
             tmp_path=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = sweep / "report"
    md = (out / "table4_synthetic.md").read_text()
    for row in ("| Base |", "| iHAS-1 |", "| iHAS-2 |", "| iHAS-3 |", "| iHAS-4 |", "| iHAS |"):
        assert row in md
    assert "(iii) polarization helps" in md and "(v) own-cluster model better" in md
    for fig in ("figure3", "figure5", "figure6"):
        assert (out / f"{fig}_synthetic.png").stat().st_size > 1000
    rep = json.loads((out / "report.json").read_text())
    assert rep["datasets"]["synthetic"]["kinds"] == ["table4"] and not rep["missing"]
    claims = rep["datasets"]["synthetic"]["table4"]["claims"]
    assert claims["ii_ihas1_vs_ihas2"]["seeds"] == [0, 1]


def test_table3_multirun_transfers_each_source_once(tmp_path):
    sweep = tmp_path / "t3"
    r = _cli("-m", "experiment=table3", "dataset=synthetic", *TINY, "seed=0", "backbone=fm,deepfm",
             f"hydra.sweep.dir={sweep}", tmp_path=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (sweep / "sources").iterdir()) == ["adafs_soft-seed0", "ihas-seed0"]
    md = (sweep / "report" / "table3_synthetic.md").read_text()
    for b in ("fm", "deepfm"):
        for label in ("original", "AdaFS-soft", "iHAS"):
            assert f"| {b} | {label} | 1 |" in md
    assert "(i) deepfm gains from iHAS" in md


def test_paired_comparison_and_own_cluster_claim():
    from ihas_lightning.report.ablation import own_cluster, paired

    a = {0: {"test_auc": 0.80, "test_logloss": 0.40}, 1: {"test_auc": 0.82, "test_logloss": 0.41},
         2: {"test_auc": 0.81, "test_logloss": 0.39}}  # fmt: skip
    b = {s: {"test_auc": v["test_auc"] - 0.019 - 0.001 * s, "test_logloss": v["test_logloss"] + 0.01}
         for s, v in a.items()}  # fmt: skip
    c = paired(a, b)
    assert c["test_auc"]["mean"] == pytest.approx(0.02) and c["test_auc"]["verdict"] == "better"
    assert c["test_logloss"]["mean"] == pytest.approx(-0.01) and c["test_logloss"]["verdict"] == "better"
    wide = {
        s: {"test_auc": v["test_auc"] - 0.01 * (s + 1), "test_logloss": v["test_logloss"]}
        for s, v in a.items()
    }
    assert paired(a, wide)["test_auc"]["verdict"] == "tie"  # +0.01..+0.03 over 3 seeds: the CI holds 0
    assert paired(b, a)["test_auc"]["verdict"] == "worse"
    cs = {"per_cluster": [{"own_minus_others_auc": 0.01, "own_minus_others_logloss": -0.02,
                           "own_is_best_auc": True, "own_is_best_logloss": True},
                          {"own_minus_others_auc": -0.03, "own_minus_others_logloss": 0.0,
                           "own_is_best_auc": False, "own_is_best_logloss": True}]}  # fmt: skip
    o = own_cluster([{"case_study": cs}, {"case_study": cs}])
    assert o["own_minus_others_auc"]["mean"] == pytest.approx(-0.01)
    assert o["own_best_share_auc"] == 0.5 and o["own_best_share_logloss"] == 1.0


def _fake_job(root, name, method, seed, auc, *, y=None, logits=None, het=None, served=None, error=None):
    """A stage=all job dir as collect() reads it (config, results.json, test scores), no training."""
    import numpy as np
    from omegaconf import OmegaConf

    job = root / name
    (job / ".hydra").mkdir(parents=True)
    display = {"ihas": "iHAS", "ihas_2": "iHAS-2", "base": "Base", "pep": "PEP"}[method]
    OmegaConf.save(OmegaConf.create({"stage": {"name": "all"}, "method": {"name": method, "display": display},
                                     "dataset": {"name": "toy"}, "seed": seed, "model": {"backbone": "mlp"}}),
                   job / ".hydra" / "config.yaml")  # fmt: skip
    overrides = [
        f"method={method}",
        f"seed={seed}",
        f"dataset.prepared_dir={root.parent / 'prepared' / 'toy'}",
    ]
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    if error:
        (job / "error.txt").write_text(f"error: {job}/search/best.ckpt: {error}")
        return job
    (job / "evaluate").mkdir()
    final = {"model": display, "test_auc": auc, "test_logloss": 0.4, "val_auc": auc, "val_logloss": 0.4,
             "params": 10, "embedding_params": 8, "dense_params": 2, "inference_ms": 1.0 if served == "fast" else 5.0,
             "inference_exact_ms": 5.0 if served else None}  # fmt: skip
    rows = [final] + ([{**final, "model": "iHAS-1"}] if method == "ihas" else [])
    res = {"rows": rows, "final_row": display, "backbone": "mlp", "timing_rows": 100000,
           "timing_rows_replaced": True, "served_routing": served, "heterogeneity": het}  # fmt: skip
    (job / "evaluate" / "results.json").write_text(json.dumps(res))
    if y is not None:
        np.savez_compressed(job / "evaluate" / "test_scores.npz", y=y, logits=logits, row=np.array(display))
    return job


def test_report_of_a_sweep_names_it_relatively_lists_failures_once_and_pairs_ihas_with_ihas2(tmp_path):
    import numpy as np

    from ihas_lightning.report.build import write_reports
    from ihas_lightning.stats import paired_auc_difference

    rng = np.random.default_rng(0)
    sweep = tmp_path / "t4sweep"
    y = (rng.random(400) < 0.3).astype(np.int8)
    het = {"statistic": 0.5, "trained_statistic": 0.6, "null_mean": 0.02, "null_q95": 0.05, "p_value": 1 / 201,
           "permutations": 200, "rows": 400}  # fmt: skip
    scores = {}
    for seed in (0, 1):
        a = (y + rng.normal(0, 0.8, 400)).astype(np.float32)
        b = (y + rng.normal(0, 1.0, 400)).astype(np.float32)
        scores[seed] = (a, b)
        _fake_job(sweep, f"{2 * seed}", "ihas", seed, 0.8, y=y, logits=a, het=het, served="fast")
        _fake_job(sweep, f"{2 * seed + 1}", "ihas_2", seed, 0.78, y=y, logits=b)
    _fake_job(sweep, "9", "pep", 0, None, error="PEP never reached the budget 0.5")
    rep = write_reports(sweep, kind="auto")
    assert rep["datasets"]["toy"]["kinds"] == ["table4"]
    md = (sweep / "report" / "table4_toy.md").read_text()
    assert str(tmp_path) not in md and "/tmp/" not in md and "`t4sweep`" in md
    assert md.count("PEP never reached the budget 0.5") == 1 and "* `9` (pep, seed 0)" in md
    per = rep["datasets"]["toy"]["table4"]["heterogeneity"]["per_seed"]
    want = paired_auc_difference(y, *scores[1])
    assert per[1]["ihas_minus_ihas2"]["diff"] == pytest.approx(want["diff"])
    assert per[1]["ihas_minus_ihas2"]["ci"] == pytest.approx(want["ci"])
    assert (
        f"{want['diff']:+.4f} [{want['ci'][0]:+.4f}, {want['ci'][1]:+.4f}]" in md
        and "| 0 | 0.500 | 0.020 | 0.0050 |" in md
    )
    assert "| iHAS | search, cluster, retrain, routing | 2 |" in md and "exact routing ms" in md
    text = (sweep / "report" / "report.json").read_text()
    assert str(tmp_path) not in text  # no machine path in the committed report.json ...
    assert '"dataset.prepared_dir=.../toy"' in text  # ... an override's path by its name
    t2 = write_reports(sweep, kind="table2")
    md2 = (sweep / "report" / "table2_toy.md").read_text()
    assert "| 1.00 ± 0.00 (fast) | 5.00 ± 0.00 |" in md2 and "drawn with replacement" in md2
    assert "## Heterogeneity of iHAS's clusters" in md2 and md2.count("PEP never reached") == 1
    assert t2["root"] == "t4sweep"


def test_report_json_names_no_absolute_path():
    """report.json holds no machine path: overrides by their last component, and a path inside any
    message (e.g. a skipped retrain guard's reason) too; a unit such as rows/s is left alone."""
    from ihas_lightning.report.build import _portable

    got = _portable(
        {
            "overrides": ["dataset.train_path=/data/x/train.csv", "seed=1"],
            "retrain_guard": {"skipped": "no Base (default /tmp/s/15/base/search/best.ckpt; stage=all)"},
            "note": "1,000 rows/s at 0.5 ms/row",
            "path": "/tmp/s/15",
        }
    )
    assert got["overrides"] == ["dataset.train_path=.../train.csv", "seed=1"]
    assert got["retrain_guard"]["skipped"] == "no Base (default .../best.ckpt; stage=all)"
    assert got["note"] == "1,000 rows/s at 0.5 ms/row" and "path" not in got


def test_the_heterogeneity_verdict_reads_the_gate_masks_test_first():
    """results.md leads with one line: instance-wise yes / not shown / no, from the gate masks' permutation
    p (the architectures' p beside it), at p < 0.01."""
    from ihas_lightning.report.tables import heterogeneity_lines, heterogeneity_verdict

    het = {"statistic": 6.25, "p_value": 0.5721, "soft_statistic": 6.25, "soft_p_value": 0.005}
    yes = heterogeneity_verdict(het)
    assert yes.startswith("**Instance-wise here: yes.**") and "gate masks" in yes and "p = 0.0050" in yes
    assert "within what random clusters" in yes and "p = 0.5721" in yes
    not_shown = heterogeneity_verdict({**het, "soft_p_value": 0.2})
    assert not_shown.startswith("**Instance-wise here: not shown.**") and "p = 0.2000" in not_shown
    arch_only = heterogeneity_verdict({"statistic": 3.0, "p_value": 0.004, "soft_p_value": None})
    assert arch_only.startswith("**Instance-wise here: yes.**") and "architectures differ" in arch_only
    same = {"statistic": 0.0, "p_value": 1.0, "soft_statistic": 0.0, "soft_p_value": 1.0}
    assert heterogeneity_verdict(same).startswith("**Instance-wise here: no.**")
    full = {**het, "rows": 20_000, "trained_statistic": 6.25, "permutations": 200, "null_mean": 3.5,
            "null_q95": 6.25, "soft_null_mean": 0.04, "soft_null_q95": 0.09}  # fmt: skip
    lines = heterogeneity_lines(full)
    assert lines[0] == yes and any("Heterogeneity of the clusters' architectures" in ln for ln in lines)
