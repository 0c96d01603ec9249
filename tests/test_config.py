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


@pytest.mark.parametrize("method", ["ihas", "ihas_2", "ihas_3", "ihas_4"])
def test_every_gate_key_the_selector_reads_follows_method_gate(tmp_path, method):
    """method.gate.<key> is what users override; method.selector.<key> is what builds the gate. A key
    missing from the selector block would silently build the gate with the file's default."""
    from ihas_lightning.modules.search import GATE_SELECTOR_KEYS

    changed = {"tau": 0.2, "instance_wise": False, "bins": 7, "init_bias": 0.5, "input_norm": "batch",
               "lambda_reg": 0.01, "polarization": False, "polarization_weight": 0.3, "threshold": "half"}  # fmt: skip
    assert set(changed) == set(GATE_SELECTOR_KEYS)
    cfg = compose(
        [f"method={method}", *(f"method.gate.{k}={v}" for k, v in changed.items())], output_dir=tmp_path
    )
    assert {k: cfg.method.selector[k] for k in changed} == changed


def test_sparse_search_reaches_the_selector_and_leaves_the_pretraining(tmp_path):
    base = compose(["dataset=criteo"], output_dir=tmp_path)
    cfg = compose(["dataset=criteo", "experiment=sparse_search"], output_dir=tmp_path)
    assert base.method.selector.polarization_weight == 1.0  # the default: the paper's regularizer
    assert cfg.method.selector.polarization_weight == 0.1 and cfg.method.arch_optim.lr == 0.03
    assert cfg.method.patience == 12 and cfg.search.model_lr_scale == 1.0
    # the pretraining (= Base) keeps the search group's patience
    assert cfg.search.pretrain.patience == base.search.pretrain.patience


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
    [("model.embed_dim=0", "model.embed_dim"), ("model.lr=-1", "model.lr"), ("seed=-1", "seed"),
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


@pytest.mark.parametrize(
    "override, expected",
    [("seed=abc", "error: config key 'seed': Value 'abc' of type 'str' could not be converted to Integer"),
     ("cluster.batch_size=x", "error: config key 'cluster.batch_size': Value 'x'"),
     ("model.hidden=abc", "error: config key 'model.hidden': Invalid value assigned: str is not a ListConfig"),
     ("model.lrr=1", "error: config key 'model.lrr': no such key (the keys of model: name, backbone, "),
     ("+model.lrr=1", "error: config key 'model.lrr': no such key in model (the schema"),
     ("+search.pretrain.foo=1", "error: config key 'search.pretrain.foo': no such key in search.pretrain"),
     ("trainer.bogus=1", "error: config key 'trainer.bogus': no such key (add a new one with +trainer.bogus=...)"),
     ("search.gate_evry=3", "error: config key 'search.gate_evry': no such key"),
     ("method=nope", "error: Could not find 'method/nope'; available: adafs_hard, adafs_soft, autofield, base,"),
     ("seed=[1", "error: a command-line override does not parse: no viable alternative at input '[1'")],
)  # fmt: skip
def test_a_config_that_does_not_compose_is_one_line_and_exit_2(tmp_path, override, expected):
    """Types and key names are checked by Hydra against the schema while composing (no stage module is
    imported yet); the entry point prints Hydra's report as one line."""
    r = subprocess.run(
        [sys.executable, "-m", "ihas_lightning", "stage=all", override, f"paths.log_dir={tmp_path}",
         f"paths.data_dir={tmp_path}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(expected), r.stderr
    assert not list(tmp_path.glob("synthetic-*"))  # nothing prepared


def test_the_schema_types_every_value_of_every_group_option():
    """Each group option composes into the schema, and the composed values have the schema's types
    (an int key given as 1.0 in a YAML would fail here, not in the middle of a run)."""
    from omegaconf import OmegaConf

    from ihas_lightning.schema import Config

    cfg = compose(["stage=all", "dataset=criteo", "method=pep", "backbone=deepfm", "logger=csv"])
    assert OmegaConf.get_type(cfg) is Config
    assert isinstance(cfg.seed, int) and isinstance(cfg.model.lr, float) and isinstance(cfg.cluster.k, int)
    assert OmegaConf.missing_keys(cfg.method) == set() and OmegaConf.missing_keys(cfg.model) == set()
    with pytest.raises(Exception, match="not in 'ModelConfig'"):
        cfg.model.lrr = 1


def test_trainer_values_are_checked_by_building_a_trainer(cfg_factory):
    from ihas_lightning.errors import ConfigError
    from ihas_lightning.validate import check_config

    with pytest.raises(ConfigError, match="config key 'trainer.accelerator'"):
        check_config(cfg_factory("stage=all", "trainer.accelerator=tpu"))
    with pytest.raises(ConfigError, match="config key 'trainer.precision'"):
        check_config(cfg_factory("stage=search", "trainer.precision=7"))
    check_config(cfg_factory("stage=prepare", "trainer.accelerator=tpu"))  # prepare trains nothing


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


def test_dataset_configs_describe_data_only():
    """No method, gate, optimizer or budget key in conf/dataset/*.yaml: every dataset runs the same method
    defaults (a value that must differ is derived from the data, e.g. model.batch_size=auto)."""
    from pathlib import Path

    import yaml

    from ihas_lightning.config import compose

    conf = Path(__file__).resolve().parents[1] / "conf" / "dataset"
    for f in sorted(conf.glob("*.yaml")):
        doc = yaml.safe_load(f.read_text()) or {}
        top = set(doc) - {"defaults"}
        global_pkg = f.read_text().lstrip().startswith("# @package _global_")
        assert top <= ({"dataset"} if global_pkg else top), f"{f.name}: {sorted(top - {'dataset'})}"
    base = compose(["dataset=criteo"])
    for name in [f.stem for f in conf.glob("*.yaml")]:
        cfg = compose([f"dataset={name}"])
        for group in ("method", "search", "model", "retrain", "cluster"):
            assert cfg[group] == base[group], (name, group)
