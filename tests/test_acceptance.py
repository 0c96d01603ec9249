"""The synthetic acceptance runner (``python -m experiments.bench.acceptance``): its verdicts and table."""

from __future__ import annotations

import pytest

from experiments.bench import acceptance


def _run(seed, gain, f1s):
    base = 0.80
    return {
        "seed": seed,
        "seconds": 1.0,
        "auc": {"Base": base, "iHAS-1": base, "iHAS": base + gain},
        "logloss": {"Base": 0.5, "iHAS-1": 0.5, "iHAS": 0.5},
        "inference_ms": {"Base": 1.0, "iHAS-1": 30.0, "iHAS": 31.0},
        "auc_gain": gain,
        "field_dims": [],
        "clusters": [{"cluster": c, "group": c, "purity": 1.0, "f1": f} for c, f in enumerate(f1s)],
        "min_f1": min(f1s),
    }


def test_summary_verdicts():
    ok = acceptance.summarise("a", [], [_run(0, 0.002, [0.8, 1.0]), _run(1, 0.0015, [0.86, 0.9])])
    v = ok["acceptance"]
    assert v["ihas_beats_base"] and v["ihas_beats_base_significant"]
    assert v["f1_target_met"] and v["min_cluster_f1"] == 0.8 and ok["all_seeds"] == v
    runs = [_run(0, 0.0005, [0.9, 1.0]), _run(1, 0.001, [1.0, 1.0]), _run(2, 0.003, [0.8, 0.85]),
            _run(3, -0.001, [0.79, 1.0])]  # fmt: skip
    bad = acceptance.summarise("b", ["x=1"], runs)
    first3, every = bad["acceptance"], bad["all_seeds"]
    assert first3["seeds"] == [0, 1, 2] and every["seeds"] == [0, 1, 2, 3]
    assert first3["ihas_beats_base"] and not first3["ihas_beats_base_significant"]  # 0.0005 < 0.001
    assert first3["f1_target_met"] and first3["min_cluster_f1"] == 0.8
    assert not every["ihas_beats_base"] and not every["f1_target_met"] and every["min_cluster_f1"] == 0.79
    md = acceptance.markdown({"host": {"date": "d", "cpus": 2}, "settings": [ok, bad]})
    assert "| b | 3 | 0.8000 | 0.8000 | 0.7990 | -0.0010 | 1.00 / 1.00 | 0.79 / 1.00 | - |" in md
    assert "| b | `x=1` | 0,1,2 | yes | 0.80 | yes | no | 0.79 | no |" in md


def test_a_failing_run_stops_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"setting 'bad' seed 0 failed: .*dataset/nope"):
        acceptance.run_one(["dataset=nope"], 0, tmp_path, tmp_path, "bad")
    assert (tmp_path / "acceptance-bad-s0.log").is_file()
