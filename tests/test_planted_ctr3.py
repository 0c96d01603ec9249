"""experiments.bench.planted_ctr3: one row per run dir, read from the run's own files."""

from __future__ import annotations

import json

import pytest

from experiments.bench.planted_ctr3 import main, run_record


def _run_dir(root, name, *, fallback: bool, rows: int = 1000):
    d = root / name
    prepared = root / f"prepared-{name}"
    prepared.mkdir(parents=True)
    (prepared / "truth.json").write_text(
        json.dumps(
            {"pos_rate": 0.03, "bayes_val_auc": 0.83, "params": {"rows": rows, "split": [0.8, 0.1, 0.1]}}
        )
    )
    (d / "search").mkdir(parents=True)
    (d / "evaluate").mkdir()
    (d / "cluster").mkdir()
    (d / "config.yaml").write_text(f"dataset:\n  prepared_dir: {prepared}\n")
    cands = [{"epoch": 5, "admissible": False}, {"epoch": 6, "admissible": not fallback}]
    sel = {
        "reference": {"val_auc": 0.71},
        "candidates": cands,
        "chosen_epoch": None if fallback else 6,
        "fallback": "gates open" if fallback else None,
        "stop_when": "no_progress",
    }
    groups = {"0": {"f1": 1.0}, "1": {"f1": 0.5}}
    (d / "search" / "metrics.json").write_text(
        json.dumps(
            {
                "sparsest_selection": sel,
                "open_share": 1.0 if fallback else 0.05,
                "recovery": {"groups": groups},
            }
        )
    )
    rows = [{"model": m, "test_auc": a} for m, a in (("Base", 0.70), ("iHAS-1", 0.71), ("iHAS", 0.72))]
    (d / "evaluate" / "results.json").write_text(json.dumps({"rows": rows, "recovery": {"min_f1": 0.6}}))
    (d / "cluster" / "cluster.json").write_text(json.dumps({"field_dims": [[16, 0], [0, 3]]}))
    return d


def test_a_row_per_run_from_its_files(tmp_path):
    r = run_record("big", _run_dir(tmp_path, "a", fallback=False, rows=1_600_000))
    assert r["train_positives"] == 38_400  # 1.6M x 0.8 x 0.03
    assert (r["chosen_epoch"], r["fallback"], r["search_epochs"]) == (6, False, 2)
    assert r["search_group_f1"] == {"0": 1.0, "1": 0.5} and r["cluster_min_f1"] == 0.6
    assert r["test_auc"] == {"Base": 0.70, "iHAS-1": 0.71, "iHAS": 0.72}
    f = _run_dir(tmp_path, "b", fallback=True)
    out = tmp_path / "out" / "report"
    assert main(["--out", str(out), "--run", f"small={f}", "--run", f"big={tmp_path / 'a'}"]) == 0
    md = out.with_suffix(".md").read_text()
    small, big = (ln for ln in md.splitlines() if ln.startswith(("| small", "| big")))
    assert "| gates open |" in small and "| 6 |" in big and "16,0 / 0,3" in big
    assert len(json.loads(out.with_suffix(".json").read_text())) == 2


def test_a_run_dir_that_is_not_finished_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="not LABEL=DIR of a finished run dir"):
        main(["--out", str(tmp_path / "r"), "--run", f"x={tmp_path}"])


def test_planted_seeds_summarises_a_setting_over_its_runs(tmp_path):
    """experiments.bench.planted_seeds: runs with one SETTING label are one row; F1 count, paired diffs."""
    from experiments.bench.planted_seeds import main as seeds_main

    dirs = []
    for i, (f1, base) in enumerate([(1.0, 0.70), (0.75, 0.69), (0.9, 0.71)]):
        d = _run_dir(tmp_path, f"r{i}", fallback=False)
        (d / "config.yaml").write_text((d / "config.yaml").read_text() + f"seed: {30 + i}\n")
        per = [{"purity": 1.0 - 0.1 * i, "f1": f1}, {"purity": 1.0, "f1": 1.0}]
        rows = [
            {"model": m, "test_auc": base + up} for m, up in (("Base", 0), ("iHAS-1", 0.002), ("iHAS", 0.004))
        ]
        (d / "evaluate" / "results.json").write_text(
            json.dumps({"rows": rows, "recovery": {"min_f1": f1, "per_cluster": per}})
        )
        dirs.append(d)
    out = tmp_path / "out" / "seeds"
    assert seeds_main(["--out", str(out), *(a for d in dirs for a in ("--run", f"25%, half={d}"))]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    (s,) = res["settings"]
    assert s["seeds"] == [30, 31, 32] and s["runs_f1_at_least_0.9"] == 2 and s["worst_cluster_f1_min"] == 0.75
    assert s["purity_min"] == pytest.approx(0.8) and s["fallbacks"] == 0
    assert s["ihas_minus_base_auc"]["mean"] == pytest.approx(0.004)
    assert s["ihas_minus_base_auc"]["ci"][0] == pytest.approx(0.004)  # the same gain in every run: no spread
    md = out.with_suffix(".md").read_text()
    assert "| 25%, half | 30, 31, 32 | 0/3 |" in md and "| 2/3 |" in md
    with pytest.raises(SystemExit, match="not SETTING=DIR of a finished stage=all run dir"):
        seeds_main(["--out", str(out), "--run", f"x={tmp_path}"])
