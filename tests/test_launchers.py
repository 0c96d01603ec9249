"""Multirun launchers: hydra/launcher=slurm (submitit) and hydra/launcher=local (joblib) compose from
conf/hydra/launcher/, and a local multirun runs its jobs in parallel processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ihas_lightning.config import CONFIG_DIR, register_resolvers


def _hydra_cfg(*overrides: str):
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True).hydra


@pytest.mark.parametrize(
    "launcher, target, keys",
    [("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
      {"timeout_min": 720, "gpus_per_node": 1, "array_parallelism": 64}),
     ("local", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", {"n_jobs": 2}),
     ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", {"n_jobs": -1})],
)  # fmt: skip
def test_launcher_configs_compose(launcher, target, keys):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the launch extra (make install)")
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the launch extra (make install)")
    h = _hydra_cfg(
        f"hydra/launcher={launcher}", "hydra.launcher.partition=gpu" if launcher == "slurm" else "seed=0"
    )
    assert h.launcher._target_ == target
    for k, v in keys.items():
        assert h.launcher[k] == v
    if launcher == "slurm":
        assert h.launcher.partition == "gpu"


def test_a_local_multirun_runs_two_jobs_in_parallel_processes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the launch extra (make install)")
    env = dict(os.environ, WANDB_MODE="offline")
    r = subprocess.run(
        [sys.executable, "-m", "ihas_lightning", "-m", "hydra/launcher=local", "stage=all", "dataset.rows=2500",
         "trainer=debug", "logger=none", "seed=0,1", f"paths.log_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (sweep,) = (tmp_path / "multiruns").iterdir()
    for job in ("0", "1"):
        assert (sweep / job / "evaluate" / "results.json").is_file()
    # the joblib launcher's own line: both jobs handed to a pool of 2 worker processes at once
    assert "Joblib.Parallel(n_jobs=2" in r.stdout + r.stderr and "is launching 2 jobs" in r.stdout + r.stderr
