"""trainer.threads: auto = usable cores (affinity, cgroup quota) / parallel multirun jobs."""

from __future__ import annotations

import pytest

from ihas_lightning import threads
from ihas_lightning.errors import ConfigError


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_quota(tmp_path) == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_quota(tmp_path) is None


def test_usable_cores_are_the_affinity_capped_by_the_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert threads.usable_cores(tmp_path) == 8  # no quota file
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert threads.usable_cores(tmp_path) == 3  # 2.5 CPUs -> 3 threads


@pytest.mark.parametrize("value, cores, jobs, want", [("auto", 8, 1, 8), ("auto", 8, 2, 4), ("auto", 2, 4, 1),
                                                       (3, 8, 2, 3), (None, 2, 1, 2)])  # fmt: skip
def test_choose(value, cores, jobs, want):
    assert threads.choose(value, cores=cores, jobs=jobs)[0] == want


def test_bad_values_are_one_line_errors():
    for bad in (0, -1, "many", 1.5, True):
        with pytest.raises(ConfigError, match="trainer.threads"):
            threads.check(bad)


def test_a_parallel_local_multirun_divides_the_cores(tmp_path):
    """Under hydra/launcher=local (2 jobs) on this machine each job logs cores // 2 threads."""
    import os
    import subprocess
    import sys

    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the launch extra (make install)")
    r = subprocess.run(
        [sys.executable, "-m", "ihas_lightning", "-m", "hydra/launcher=local", "stage=prepare", "dataset.rows=2000",
         "seed=0,1", f"paths.log_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}"],
        capture_output=True, text=True, env=dict(os.environ, WANDB_MODE="offline"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    want = max(1, threads.usable_cores() // 2)
    logs = [p.read_text() for p in (tmp_path / "multiruns").glob("*/*/__main__.log")]
    assert len(logs) == 2 and all(
        f"torch threads: {want} (auto:" in t and "/ 2 parallel job(s)" in t for t in logs
    )
