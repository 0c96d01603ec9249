"""Search stage: bi-level optimisation schedule, phase-aware selection, end-to-end runs, reload."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ihas_lightning.errors import ConfigError, DataError
from ihas_lightning.modules.search import SearchModule

VOCAB = [7, 11, 5, 9]
MODEL = {
    "embed_dim": 4,
    "hidden": [8, 4],
    "lr": 1e-2,
    "weight_decay": 1e-6,
    "embedding_optimizer": "sparse_adam",
}
GATE = {"tau": 0.1, "lambda_reg": 1e-3, "polarization": True, "instance_wise": True, "bins": 10, "lr": 1e-2,
        "init_bias": 1.0}  # fmt: skip


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.stack([torch.randint(0, v, (n,), generator=g) for v in VOCAB], 1).int()
    y = ((x[:, 0] + x[:, 1]) % 2).float()
    return x, y


def _loader(n: int, seed: int, bs: int = 16, shuffle: bool = False):
    return DataLoader(TensorDataset(*_data(n, seed)), batch_size=bs, shuffle=shuffle)


class Recorder(SearchModule):
    """Counts optimizer steps per (epoch, batch) and checks that each level leaves the other alone."""

    def setup(self, stage):
        self.events: list[tuple[int, int, str]] = []
        self.gate_before_fit = [p.detach().clone() for p in self.model.gate_parameters()]
        self.gate_after_pretrain = None
        self.gate_opt_state_after_pretrain = None

    def configure_optimizers(self):
        opts = super().configure_optimizers()
        for name, opt in zip(("emb", "dense", "gate"), opts):
            orig = opt.step

            def step(*a, _orig=orig, _name=name, **k):
                self.events.append((self.current_epoch, self._batch_idx, _name))
                return _orig(*a, **k)

            opt.step = step
        return opts

    def training_step(self, batch, batch_idx):
        self._batch_idx = batch_idx
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self):
        if self.current_epoch == self.search_start_epoch - 1:
            self.gate_after_pretrain = [p.detach().clone() for p in self.model.gate_parameters()]
            self.gate_opt_state_after_pretrain = len(self.optimizers()[2].optimizer.state)

    def model_step(self, x, y, mode="open"):
        gate = [p.detach().clone() for p in self.model.gate_parameters()]
        loss = super().model_step(x, y, mode)
        assert all(torch.equal(a, b) for a, b in zip(gate, self.model.gate_parameters())), (
            "model step moved gate"
        )
        return loss

    def gate_step(self, x, y):
        model = [
            p.detach().clone() for p in self.model.embedding_parameters() + self.model.dense_parameters()
        ]
        out = super().gate_step(x, y)
        after = self.model.embedding_parameters() + self.model.dense_parameters()
        assert all(torch.equal(a, b) for a, b in zip(model, after)), "gate step moved a model param"
        return out


def _trainer(epochs: int, **kw):
    return L.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", **kw,
    )  # fmt: skip


def test_optimizer_schedule_pretrain_then_bilevel():
    torch.manual_seed(0)
    n_batches, k = 10, 3
    m = Recorder(VOCAB, MODEL, GATE, pretrain_epochs=2, search_every=k)
    m.set_search_loader(_loader(64, 1, shuffle=True))
    _trainer(4).fit(m, _loader(16 * n_batches, 0), _loader(64, 2))
    ev = m.events
    for epoch in range(4):
        for name in ("emb", "dense"):
            assert [b for e, b, nm in ev if e == epoch and nm == name] == list(range(n_batches))
        gate_batches = [b for e, b, nm in ev if e == epoch and nm == "gate"]
        assert gate_batches == ([] if epoch < 2 else [0, 3, 6, 9])
    # gate untouched during pretraining (not even Adam state), trained afterwards
    assert all(torch.equal(a, b) for a, b in zip(m.gate_before_fit, m.gate_after_pretrain))
    assert m.gate_opt_state_after_pretrain == 0
    assert not all(torch.equal(a, b) for a, b in zip(m.gate_before_fit, m.model.gate_parameters()))
    assert m.gate_steps == 8
    assert m.eval_mode == "deterministic"


def test_validation_mode_and_gate_metrics_per_phase():
    torch.manual_seed(0)
    m = SearchModule(VOCAB, MODEL, GATE, pretrain_epochs=1, search_every=2, field_names=["a", "b", "c", "d"])
    m.set_search_loader(_loader(64, 1))
    logged = []

    class Grab(L.Callback):
        def on_validation_end(self, trainer, pl_module):  # after the module's epoch-end logging
            logged.append((trainer.current_epoch, pl_module.eval_mode, dict(trainer.callback_metrics)))

    tr = _trainer(2, callbacks=[Grab()])
    tr.fit(m, _loader(64, 0), _loader(64, 2))
    (e0, mode0, met0), (e1, mode1, met1) = logged
    assert mode0 == "open" and "val/open_share" not in met0
    assert mode1 == "deterministic" and 0.0 <= float(met1["val/open_share"]) <= 1.0
    assert "val/open_share/c" in met1 and "val/gate/mean_threshold" in met1
    assert m.last_gate_summary["val"]["samples"] == 64


@pytest.mark.parametrize("ablation", [{"instance_wise": False}, {"polarization": False}])
def test_ablations_train_the_gate(ablation):
    torch.manual_seed(0)
    m = SearchModule(VOCAB, MODEL, {**GATE, **ablation}, pretrain_epochs=0, search_every=1)
    m.set_search_loader(_loader(64, 1))
    before = [p.detach().clone() for p in m.model.gate_parameters()]
    _trainer(1).fit(m, _loader(64, 0), _loader(64, 2))
    assert not all(torch.equal(a, b) for a, b in zip(before, m.model.gate_parameters()))
    assert m.gate_steps == 4 and "val" in m.last_gate_summary


def test_no_search_loader_is_an_error():
    m = SearchModule(VOCAB, MODEL, GATE, pretrain_epochs=0, search_every=1)
    with pytest.raises(RuntimeError, match="search loader"):
        m.next_search_batch()


# ---- stage-level tests (real config, prepared data) --------------------------------------------------
def _run(cfg_factory, *overrides):
    from ihas_lightning.stages.search import run

    cfg = cfg_factory(*overrides)
    return cfg, run(cfg)


SMALL = ["dataset.rows=5000", "model.batch_size=256", "search.search_every=2"]
# exactly one pretraining epoch
PRE1 = ["search.pretrain.max_epochs=1", "search.pretrain.patience=null"]


def test_search_fast_dev_run_synthetic_and_reload(cfg_factory):
    from ihas_lightning.stages.search import load_search_model

    cfg, metrics = _run(
        cfg_factory, *SMALL, "trainer=debug", "search.pretrain.max_epochs=0", "search.max_epochs=2"
    )
    out = cfg.paths.output_dir + "/search"
    saved = json.load(open(f"{out}/metrics.json"))
    for key in ("val/auc", "test/auc", "test/logloss", "open_share", "open_share_per_field", "samples_per_s"):
        assert saved[key] is not None, key
    assert set(saved["recovery"]["groups"]) == {"0", "1"}
    manifest = json.load(open(f"{out}/manifest.json"))
    assert manifest["feature_map_hash"] and manifest["prepared_dir"]
    import os

    assert os.path.getsize(f"{out}/gate_hist.png") > 1000
    # reloading the best checkpoint gives identical deterministic predictions
    from ihas_lightning.data.datamodule import IHASDataModule

    dm = IHASDataModule(manifest["prepared_dir"], batch_size=256)
    x, _ = next(iter(dm.split_dataloader("test")))
    a = load_search_model(f"{out}/best.ckpt", dm.feature_map)
    b = load_search_model(f"{out}/best.ckpt", dm.feature_map)
    assert a.eval_mode == "deterministic"
    pa, pb = a(torch.as_tensor(x)), b(torch.as_tensor(x))
    assert torch.equal(pa, pb)
    assert torch.equal(pa, a(torch.as_tensor(x)))


def test_search_short_run_selects_phase2_checkpoint(cfg_factory):
    cfg, metrics = _run(cfg_factory, *SMALL, *PRE1, "search.max_epochs=1", "search.patience=1")
    assert metrics["best_epoch"] == 1  # epoch 0 (pretraining) is never selected
    assert metrics["gate_steps"] > 0 and 0 < metrics["open_share"] <= 1


def test_search_resume_continues_from_last_checkpoint(cfg_factory, tmp_path):
    cfg, first = _run(cfg_factory, *SMALL, *PRE1, "search.max_epochs=1")
    last = cfg.paths.output_dir + "/search/last.ckpt"
    from ihas_lightning.stages.search import run

    cfg2 = cfg_factory(*SMALL, *PRE1, "search.max_epochs=2", f"search.resume={last}",
                       output_dir=tmp_path / "resumed")  # fmt: skip
    second = run(cfg2)
    assert second["epochs_run"] == 3 and second["best_epoch"] >= 1
    assert second["train_samples"] < 2 * first["train_samples"]  # only the third epoch was trained
    with pytest.raises(DataError, match="search.resume"):
        run(cfg_factory(*SMALL, f"search.resume={tmp_path / 'nope.ckpt'}"))


def test_base_fast_dev_run(cfg_factory):
    cfg, metrics = _run(cfg_factory, *SMALL, "trainer=debug", "method=base")
    assert metrics["method"] == "base" and metrics["test/auc"] is not None
    assert "open_share" not in metrics


@pytest.mark.shared
def test_search_fast_dev_run_criteo_sample(cfg_factory, criteo_raw):
    cfg, metrics = _run(
        cfg_factory, "dataset=criteo", f"dataset.train_path={criteo_raw['train']}",
        f"dataset.val_path={criteo_raw['val']}", f"dataset.test_path={criteo_raw['test']}",
        "dataset.min_count=2", "model.batch_size=512", "trainer=debug", "search.pretrain.max_epochs=0",
        "search.max_epochs=1",
    )  # fmt: skip
    assert metrics["test/auc"] is not None and len(metrics["open_share_per_field"]) == 39


def test_unknown_trainer_key_and_bad_budget(cfg_factory):
    from ihas_lightning.stages.search import run

    with pytest.raises(ConfigError, match="trainer.bogus"):
        run(cfg_factory(*SMALL, "+trainer.bogus=1"))
    with pytest.raises(ConfigError, match="'search.max_epochs'"):
        run(cfg_factory(*SMALL, "search.max_epochs=0"))
    with pytest.raises(ConfigError, match="'search.pretrain.patience'"):
        run(cfg_factory(*SMALL, "search.pretrain.patience=-1"))
    # a Lightning user's budget key names the stage keys instead of being silently ignored
    with pytest.raises(ConfigError, match="'trainer.max_epochs'.*search.max_epochs"):
        run(cfg_factory(*SMALL, "trainer.max_epochs=5"))
    with pytest.raises(ConfigError, match="'trainer.max_steps'.*retrain.max_epochs"):
        run(cfg_factory(*SMALL, "+trainer.max_steps=5"))


def test_load_search_model_errors(tmp_path):
    from ihas_lightning.data.feature_map import FeatureMap, Field
    from ihas_lightning.stages.search import load_search_model

    with pytest.raises(DataError, match="not found"):
        load_search_model(tmp_path / "missing.ckpt")
    m = SearchModule(VOCAB, MODEL, GATE, pretrain_epochs=0, search_every=1)
    tr = _trainer(1, limit_train_batches=1, limit_val_batches=1)
    m.set_search_loader(_loader(32, 1))
    tr.fit(m, _loader(32, 0), _loader(32, 2))
    path = tmp_path / "m.ckpt"
    tr.save_checkpoint(path)
    fm = FeatureMap("x", [Field(f"f{i}", v) for i, v in enumerate(VOCAB)])
    assert load_search_model(path, fm).model.gate is not None
    with pytest.raises(DataError, match="vocab size of field 'f1'"):
        load_search_model(path, FeatureMap("x", [Field(f"f{i}", v + (i == 1)) for i, v in enumerate(VOCAB)]))
    with pytest.raises(DataError, match="4 fields but the prepared dataset has 3"):
        load_search_model(path, FeatureMap("x", [Field(f"f{i}", v) for i, v in enumerate(VOCAB[:3])]))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="not a readable"):
        load_search_model(bad)


def test_field_recovery_hand_example():
    from ihas_lightning.report.recovery import field_recovery

    truth = {"key_field": "key", "groups": {"0": ["a", "b"], "1": ["c"]}, "noise_fields": ["d"]}
    table = {
        "0": {"key": 1.0, "a": 0.9, "b": 0.4, "c": 0.1, "d": 0.6},
        1: {"key": 1.0, "a": 0.0, "b": 0.1, "c": 0.8, "d": 0.2},
    }
    r = field_recovery(table, truth)
    g0, g1 = r["groups"]["0"], r["groups"]["1"]
    assert g0["opened"] == ["a", "d"] and g0["precision"] == 0.5 and g0["recall"] == 0.5
    assert g0["relevant_opened_more"] is True and g0["separation"] is False
    assert g1["opened"] == ["c"] and g1["precision"] == 1.0 and g1["recall"] == 1.0 and g1["separation"]
    assert r["macro_precision"] == 0.75 and r["relevant_opened_more_all"] is True
    assert g0["key_field_mask"] == 1.0


@pytest.mark.parametrize(
    "override, key",
    [
        ("method.gate.tau=0", "method.gate.tau"),
        ("method.gate.bins=2", "method.gate.bins"),
        ("method.gate.lambda_reg=-1", "method.gate.lambda_reg"),
        ("method.gate.lr=abc", "method.gate.lr"),
        ("method.gate.weight_decay=-0.1", "method.gate.weight_decay"),
        ("method.gate.input_norm=layer", "method.gate.input_norm"),
        ("method.gate.threshold=otsu", "method.gate.threshold"),
    ],
)
def test_bad_gate_values_are_one_line_config_errors(cfg_factory, override, key):
    from ihas_lightning.stages.search import run

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        run(cfg_factory(*SMALL, override))
    assert "\n" not in str(err.value)


def test_gate_weight_decay_and_input_norm_reach_the_gate():
    gate = {**GATE, "weight_decay": 0.01, "input_norm": "center", "threshold": "half"}
    m = SearchModule(VOCAB, MODEL, gate, pretrain_epochs=0, search_every=1)
    assert m.model.gate.input_norm == "center" and m.model.gate.threshold_rule == "half"
    assert SearchModule(VOCAB, MODEL, GATE, pretrain_epochs=0).model.gate.threshold_rule == "valley"
    m.trainer = None
    groups = m.configure_optimizers()[2].param_groups
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(m.model.gate.linear.weight)] == 0.01
    assert decay[id(m.model.gate.linear.bias)] == 0.0  # the bias is never decayed
    m2 = SearchModule(VOCAB, MODEL, {**GATE, "weight_decay": None}, pretrain_epochs=0, search_every=1)
    groups = m2.configure_optimizers()[2].param_groups
    assert groups[0]["params"][0] is m2.model.gate.linear.weight
    assert groups[0]["weight_decay"] == MODEL.get("weight_decay", 1e-6)  # null -> model.weight_decay
    m3 = SearchModule(VOCAB, MODEL, {**GATE, "instance_wise": False}, pretrain_epochs=0, search_every=1)
    assert all(g["weight_decay"] == 0.0 for g in m3.configure_optimizers()[2].param_groups)


def test_holdout_mask_is_seeded_and_disjoint_from_the_models_rows():
    import numpy as np

    from ihas_lightning.stages.search import holdout_mask

    a, b = holdout_mask(10_000, 0.1, 3), holdout_mask(10_000, 0.1, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, holdout_mask(10_000, 0.1, 4))
    assert 0.08 < a.mean() < 0.12
    assert holdout_mask(5, 0.01, 0).sum() == 1 and holdout_mask(5, 0.99, 0).sum() == 4  # both sides non-empty


def test_search_gate_reads_the_holdout_and_the_model_the_rest(cfg_factory):
    cfg, metrics = _run(cfg_factory, *SMALL, *PRE1, "search.max_epochs=1", "model.output_bias=prior")
    b = metrics["budget"]
    assert b["gate_data"] == "holdout" and b["gate_rows"] + b["train_rows"] == 4000  # 80% of 5000 rows
    assert 300 < b["gate_rows"] < 500 and b["search_every"] == 2
    assert metrics["gate_steps"] == math.ceil(b["train_rows"] / 256 / 2)
    assert b["output_bias"] == pytest.approx(
        math.log(b["train_positive_rate"] / (1 - b["train_positive_rate"]))
    )
    cfg, metrics = _run(cfg_factory, *SMALL, *PRE1, "search.max_epochs=1", "search.gate_data=val")
    assert metrics["budget"]["gate_rows"] == 500 and metrics["budget"]["train_rows"] == 4000


def test_search_warns_when_it_selects_nothing():
    from ihas_lightning.stages.search import search_warnings

    ok = {"gate_steps": 500, "open_share": 0.4, "gate": {"polarization": {"share_valley_found": 0.97}}}
    assert search_warnings(ok, 200) == []
    bad = {"gate_steps": 4, "open_share": 1.0, "gate": {"polarization": {"share_valley_found": 0.0}}}
    w = search_warnings(bad, 200)
    assert len(w) == 3 and "only 4 steps" in w[0] and "closed nothing" in w[1] and "not bimodal" in w[2]
    assert "closed everything" in search_warnings({**ok, "open_share": 0.0}, 200)[0]


def test_instance_structure_separates_per_dim_from_per_sample_variation():
    from ihas_lightning.modules.search import GateStats

    g = torch.Generator().manual_seed(0)
    dims = torch.linspace(0.05, 0.95, 12)
    fixed = GateStats(12, [4, 4, 4], covariance=True)  # every sample has the same gate: not instance-wise
    p = dims.expand(100, 12)
    fixed.update((p > 0.5).float(), p, torch.full((100,), 0.5), torch.ones(100, dtype=torch.bool))
    assert fixed.instance_structure()["across_samples_share"] == pytest.approx(0.0, abs=1e-9)
    one_axis = GateStats(12, [4, 4, 4], covariance=True)  # samples move along one direction only
    s = torch.rand(100, 1, generator=g) - 0.5
    p = (0.5 + s * torch.linspace(-0.8, 0.8, 12)).clamp(0, 1)
    one_axis.update((p > 0.5).float(), p, torch.full((100,), 0.5), torch.ones(100, dtype=torch.bool))
    st = one_axis.instance_structure()
    assert st["across_samples_share"] > 0.99
    assert st["pc1_share_of_sample_variance"] == pytest.approx(1.0, abs=1e-6)
    noisy = GateStats(12, [4, 4, 4], covariance=True)
    p = torch.rand(200, 12, generator=g)
    noisy.update((p > 0.5).float(), p, torch.full((200,), 0.5), torch.ones(200, dtype=torch.bool))
    assert noisy.instance_structure()["pc1_share_of_sample_variance"] < 0.3
