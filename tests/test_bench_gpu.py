"""``make bench-gpu`` runs on the CPU (ACCEL=cpu): the same script, tiny sizes; no speed is asserted."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow  # a benchmark script's own check (lab code): make test-all
@pytest.mark.filterwarnings("ignore")
def test_bench_gpu_dry_run_on_cpu(tmp_path):
    from experiments.bench import bench_gpu

    out = tmp_path / "bench_gpu.json"
    assert bench_gpu.main(["--accelerator", "cpu", "--quick", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    cells = {(t["method"], t["batch_size"], t["precision"]) for t in r["train"]}
    assert cells == {
        (m, b, p) for m in ("base", "search") for b in (2048, 8192) for p in ("32-true", "bf16-mixed")
    }
    assert all(t["samples_per_s"] > 0 and t["timed_batches"] > 0 for t in r["train"])
    assert set(r["routed_inference"]["rows_per_s"]) == {"base", "ihas_exact", "ihas_fast"}
    parity = r["auc_parity"]
    # the device-resident path sees the host path's batches: the same run, so the same AUC
    assert parity["within_0.001"] and parity["max_abs_diff"] <= 1e-6, parity
    assert "iHAS" in parity["abs_diff"]
