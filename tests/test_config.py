"""The Hydra config tree: every group option and experiment file composes; bad values fail clearly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ihas_lightning.config import CONFIG_DIR, compose

GROUPS = ["dataset", "stage", "method", "model", "trainer", "logger", "paths", "derive"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group, tmp_path):
    options = sorted(
        p.stem for p in (CONFIG_DIR / group).glob("*.yaml") if not p.stem.startswith("_")
    )  # _x: partials
    assert options, f"conf/{group} is empty"
    for opt in options:
        cfg = compose([f"{group}={opt}"], output_dir=tmp_path)
        assert cfg.stage.name and cfg.dataset.name and cfg.method.name


@pytest.mark.parametrize("exp", sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_composes(exp, tmp_path):
    if exp == "tune_gate":  # needs the Optuna sweeper plugin: pip install -e '.[tune]' (make tune)
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the [tune] extra is not installed")
    cfg = compose([f"experiment={exp}"], output_dir=tmp_path)
    assert cfg.dataset.name


def test_ablation_switches_reach_the_method(tmp_path):
    assert compose(["experiment=no_polarization"], output_dir=tmp_path).method.gate.polarization is False
    assert compose(["experiment=non_instance_wise"], output_dir=tmp_path).method.gate.instance_wise is False


def test_data_size_aware_defaults_and_the_paper_protocol(tmp_path):
    cfg = compose(["dataset=criteo"], output_dir=tmp_path)
    assert cfg.search.search_every == "auto" and cfg.model.batch_size == "auto"
    paper = compose(["dataset=criteo", "experiment=paper_protocol"], output_dir=tmp_path)
    assert paper.search.search_every == 100 and paper.model.batch_size == 2048
    assert paper.search.gate_data == "val" and paper.method.gate.lr == 1e-3


def test_unknown_group_option_gives_hydras_message_not_a_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "ihas_lightning", "stage=nope", f"paths.log_dir={tmp_path}"],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    assert "Could not find 'stage/nope'" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_trainer_key_is_a_one_line_error(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ihas_lightning",
            "stage=search",
            "+trainer.bogus=1",
            "dataset.rows=2000",
            f"paths.log_dir={tmp_path}",
            f"paths.data_dir={tmp_path}",
            "logger=none",
        ],  # fmt: skip
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert err == ["error: config key 'trainer.bogus': not a lightning.Trainer argument"], r.stderr[-2000:]


def test_lightning_budget_key_is_a_one_line_error_naming_the_stage_keys(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "ihas_lightning", "stage=all", "trainer.max_epochs=3", "dataset.rows=2000",
         f"paths.log_dir={tmp_path}", f"paths.data_dir={tmp_path}", "logger=none"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "'trainer.max_epochs'" in err[0] and "search.max_epochs" in err[0], r.stderr[
        -2000:
    ]
    assert not (tmp_path / "synthetic-2000-7").exists()  # checked before any work (no prepare)


@pytest.mark.parametrize(
    "override, key",
    [
        ("method.selector.k=0", "method.selector"),
        ("+method.selector.bogus=1", "method.selector"),
        ("method.arch_update=sometimes", "method.arch_update"),
        ("method.arch_optim.lr=-1", "method.arch_optim.lr"),
        ("method.snapshots=[later]", "method.snapshots"),
        ("method.phases=[cluster]", "method.phases"),
        ("method.search_monitor=val/acc", "method.search_monitor"),
    ],
)
def test_bad_method_keys_are_one_line_errors_before_any_work(tmp_path, override, key):
    r = subprocess.run(
        [sys.executable, "-m", "ihas_lightning", "stage=all", "method=autofield", override, "dataset.rows=2000",
         f"paths.log_dir={tmp_path}", f"paths.data_dir={tmp_path}", "logger=none"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and f"'{key}'" in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "synthetic-2000-7").exists()  # checked before prepare


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    """Ctrl-C during training (Lightning's graceful shutdown turns it into sys.exit(1)): one line on
    stderr naming the run dir, exit 130, and the line in the run's log file."""
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-m", "ihas_lightning", "stage=all", "logger=none", "dataset.rows=20000",
         f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={run}", "trainer.enable_progress_bar=false"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "base" / "search").is_dir():  # training has started
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"interrupted (Ctrl-C); outputs of finished stages are kept in {run}")
    )
    assert "interrupted (Ctrl-C)" in (run / "__main__.log").read_text()


@pytest.mark.parametrize(
    "override, key",
    [("model.embed_dim=0", "model.embed_dim"), ("model.lr=-1", "model.lr"), ("seed=abc", "seed"),
     ("model.hidden=[0]", "model.hidden"), ("model.dropout=2", "model.dropout"),
     ("model.weight_decay=-1", "model.weight_decay")],
)  # fmt: skip
def test_common_keys_are_checked_before_prepare(cfg_factory, tmp_path, override, key):
    from ihas_lightning import pipeline
    from ihas_lightning.errors import ConfigError

    cfg = cfg_factory("stage=all", override)
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        pipeline.run_stage(cfg)
    assert not (tmp_path / "data").exists()  # nothing prepared


def test_cluster_k_is_checked_against_the_train_rows_before_training(cfg_factory, tmp_path):
    from ihas_lightning import pipeline
    from ihas_lightning.errors import ConfigError

    cfg = cfg_factory("stage=all", "dataset.rows=3000", "cluster.k=5000")
    with pytest.raises(
        ConfigError,
        match="'cluster.k': 5000 clusters need at least 5000 training rows; the train split has 2,400",
    ):
        pipeline.run_stage(cfg)
    assert not (tmp_path / "run" / "base").exists()  # no training started


def test_console_is_quiet_and_the_log_file_complete(tmp_path):
    """What a user cannot act on (GPU/TPU lines, Lightning tips, known warnings, wandb's banner) stays
    off the console but is kept in the run's log file."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    r = subprocess.run(
        [sys.executable, "-m", "ihas_lightning", "stage=all", "trainer=debug", "dataset.rows=2000",
         f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={run}"],
        capture_output=True, text=True, env={**env, "WANDB_MODE": "offline"}, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    console = r.stdout + r.stderr
    for noise in ("GPU available", "litlogger", "has `__len__` defined", "wandb: "):
        assert noise not in console, noise
    log = (run / "__main__.log").read_text()
    assert "GPU available" in log and "stage=all: finished" in log


def test_help_shows_our_groups_and_usage():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ihas_lightning", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    assert "Usage: python -m ihas_lightning" in r.stdout
    assert "backbone: dcn, deepfm, fm, mlp, wide_deep" in r.stdout and "experiment=table2" in r.stdout
