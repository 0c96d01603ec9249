"""The method framework: model = embedding + selector + backbone, structural parameter groups, the
method-agnostic search module (bilevel / joint architecture updates, schedules, snapshots), row-pruned
retraining with a rewind, and every method through stage=all."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ihas_lightning.models import DLRM
from ihas_lightning.models.backbones import BACKBONES, MLPBackbone
from ihas_lightning.models.embedding import FieldEmbedding
from ihas_lightning.modules.ctr import CTRModule
from ihas_lightning.modules.retrain import RetrainModule
from ihas_lightning.modules.search import SearchModule

VOCAB = [7, 11, 5, 9]
MODEL = {
    "embed_dim": 4,
    "hidden": [8, 4],
    "lr": 1e-2,
    "weight_decay": 1e-6,
    "embedding_optimizer": "sparse_adam",
}
SEL = "ihas_lightning.models.selectors"
METHODS = {
    "adafs_soft": {"selector": {"_target_": f"{SEL}.adafs.AdaFSSelector", "hard": False}, "arch_update": "bilevel"},
    "adafs_hard": {"selector": {"_target_": f"{SEL}.adafs.AdaFSSelector", "hard": True, "k": 2},
                   "arch_update": "bilevel"},
    "autofield": {"selector": {"_target_": f"{SEL}.autofield.AutoFieldSelector"}, "arch_update": "bilevel"},
    "optfs": {"selector": {"_target_": f"{SEL}.optfs.OptFSSelector", "lambda_reg": 1e-3},
              "arch_update": "joint", "search_epochs": 2},
}  # fmt: skip


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.stack([torch.randint(0, v, (n,), generator=g) for v in VOCAB], 1).int()
    y = ((x[:, 0] + x[:, 1]) % 2).float()
    return x, y


def _loader(n: int, seed: int, bs: int = 16):
    return DataLoader(TensorDataset(*_data(n, seed)), batch_size=bs)


def _trainer(epochs: int, **kw):
    return L.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", **kw,
    )  # fmt: skip


# ---- parameter groups come from the structure -----------------------------------------------------------
class ScaledMLP(MLPBackbone):
    """A backbone that adds its own parameter (a learned output scale)."""

    def __init__(self, field_dims, **kw):
        super().__init__(field_dims, **kw)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, h, x=None):
        return super().forward(h, x) * self.scale


def test_a_parameter_added_by_a_backbone_is_trained(monkeypatch):
    monkeypatch.setitem(BACKBONES, "scaled_mlp", ScaledMLP)
    torch.manual_seed(0)
    m = CTRModule(VOCAB, {**MODEL, "backbone": "scaled_mlp"})
    assert any(p is m.model.backbone.scale for p in m.model.dense_parameters())
    before = m.model.backbone.scale.detach().clone()
    _trainer(1).fit(m, _loader(64, 0), _loader(32, 1))
    assert not torch.equal(before, m.model.backbone.scale.detach())


def test_parameter_groups_partition_every_parameter():
    for spec in METHODS.values():
        m = SearchModule(VOCAB, MODEL, method=spec, pretrain_epochs=0)
        model = m.model
        groups = [model.embedding_parameters(), model.arch_parameters(), model.dense_parameters()]
        ids = [id(p) for g in groups for p in g]
        assert len(ids) == len(set(ids)) == len(list(model.parameters()))
        assert model.arch_parameters(), spec


# ---- the bi-level step moves only the selector's architecture parameters, the model step never does ----
class Checked(SearchModule):
    def setup(self, stage):
        self.model_steps = self.arch_steps_seen = 0

    def model_step(self, x, y, mode="open"):
        arch = [p.detach().clone() for p in self.model.arch_parameters()]
        loss = super().model_step(x, y, mode)
        assert all(torch.equal(a, b) for a, b in zip(arch, self.model.arch_parameters())), (
            "model step moved arch"
        )
        self.model_steps += 1
        return loss

    def gate_step(self, x, y):
        model = [
            p.detach().clone() for p in self.model.embedding_parameters() + self.model.dense_parameters()
        ]
        out = super().gate_step(x, y)
        after = self.model.embedding_parameters() + self.model.dense_parameters()
        assert all(torch.equal(a, b) for a, b in zip(model, after)), "arch step moved a model parameter"
        self.arch_steps_seen += 1
        return out


@pytest.mark.parametrize("name", ["adafs_soft", "adafs_hard", "autofield"])
def test_bilevel_levels_stay_disjoint(name):
    torch.manual_seed(0)
    m = Checked(VOCAB, MODEL, method=METHODS[name], pretrain_epochs=1, search_every=2)
    m.set_search_loader(_loader(64, 3))
    before = [p.detach().clone() for p in m.model.arch_parameters()]
    _trainer(2).fit(m, _loader(64, 0), _loader(32, 1))
    assert (
        m.model_steps == 8 and m.arch_steps_seen == 2
    )  # 4 batches x 2 epochs; arch steps at 0, 2 of epoch 1
    assert not all(torch.equal(a, b) for a, b in zip(before, m.model.arch_parameters()))


def test_joint_update_steps_every_group_on_every_batch():
    torch.manual_seed(0)
    m = SearchModule(VOCAB, MODEL, method=METHODS["optfs"], pretrain_epochs=0)
    assert m.arch_update == "joint"
    w0 = m.model.selector.w.detach().clone()
    e0 = m.model.embedding.tables[0].weight.detach().clone()
    _trainer(2).fit(m, _loader(64, 0), _loader(32, 1))
    assert m.gate_steps == 8  # every training batch
    assert not torch.equal(w0, m.model.selector.w.detach())
    assert not torch.equal(e0, m.model.embedding.tables[0].weight.detach())
    # tau: 1 in search epoch 0, final_temp (200) in the last of search_epochs=2
    assert float(m.model.selector.tau) == pytest.approx(200.0)


def test_autofield_tau_follows_training_steps_and_evaluation_never_moves_it():
    torch.manual_seed(0)
    m = SearchModule(VOCAB, MODEL, method=METHODS["autofield"], pretrain_epochs=0, search_every=2)
    m.set_search_loader(_loader(64, 3))
    tr = _trainer(3)
    tr.fit(m, _loader(64, 0), _loader(32, 1))
    tau = 1.0
    for _ in range(12):  # 4 batches x 3 epochs, validation after every epoch
        tau = max(0.01, tau - 5e-5) if tau > 0.01 else tau
    assert float(m.model.selector.tau) == pytest.approx(tau, abs=1e-6)
    before = float(m.model.selector.tau)
    tr.validate(m, _loader(64, 2), verbose=False)
    assert float(m.model.selector.tau) == before


# ---- snapshots, row-pruned tables, rewind -----------------------------------------------------------------
def test_row_pruned_table_holds_only_kept_rows_and_zeroes_the_rest():
    torch.manual_seed(0)
    keep = torch.rand(sum(VOCAB)) > 0.5
    bounds = [0, *torch.tensor(VOCAB).cumsum(0).tolist()]
    counts = [int(keep[bounds[f] : bounds[f + 1]].sum()) for f in range(len(VOCAB))]
    emb = FieldEmbedding(VOCAB, 3, row_counts=counts)
    emb.set_row_keep(keep)
    assert (
        emb.tables[0].num_embeddings == int(keep.sum()) + 1 and emb.embedding_entries() == int(keep.sum()) * 3
    )
    x, _ = _data(50, 1)
    out = emb(x).view(50, len(VOCAB), 3)
    for b in range(50):
        for f in range(len(VOCAB)):
            row = bounds[f] + int(x[b, f])
            if keep[row]:
                compact = int(keep[:row].sum())  # kept rows are stored in id order
                assert torch.equal(out[b, f], emb.tables[0].weight[compact])
            else:
                assert torch.equal(out[b, f], torch.zeros(3))


def test_rewind_restores_the_snapshot_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    m = SearchModule(
        VOCAB, MODEL, method={**METHODS["optfs"], "snapshots": ["init", "epoch_1"]}, pretrain_epochs=0
    )
    m.snapshot_dir = tmp_path
    _trainer(2).fit(m, _loader(64, 0), _loader(32, 1))
    snap = torch.load(tmp_path / "epoch_1.pt", weights_only=True)
    assert (tmp_path / "init.pt").is_file() and set(snap) == set(m.model.state_dict())
    w = m.model.selector.w.detach()
    keep = w > w.median()  # any mask; the derive step uses w > 0
    bounds = [0, *torch.tensor(VOCAB).cumsum(0).tolist()]
    counts = [int(keep[bounds[f] : bounds[f + 1]].sum()) for f in range(len(VOCAB))]
    r = RetrainModule(VOCAB, MODEL, field_dims=[4] * 4, kept_dims=[list(range(4))] * 4, row_counts=counts)
    r.set_row_keep(keep)
    r.init_from_snapshot(snap)
    table = snap["embedding.tables.0.weight"]
    assert torch.equal(r.model.embedding.tables[0].weight[:-1], table[keep])
    assert torch.equal(r.model.embedding.tables[0].weight[-1], torch.zeros(4))
    for k, v in r.model.backbone.state_dict().items():
        assert torch.equal(v, snap[f"backbone.{k}"]), k
    assert r.model.parameter_counts()["embedding"] == int(keep.sum()) * 4


def test_checkpoint_reloads_from_hyperparameters_with_weights_only(tmp_path):
    from ihas_lightning.rundir import load_search_model

    torch.manual_seed(0)
    m = SearchModule(VOCAB, MODEL, method=METHODS["autofield"], pretrain_epochs=0, search_every=1)
    m.set_search_loader(_loader(64, 3))
    tr = _trainer(1)
    tr.fit(m, _loader(64, 0), _loader(32, 1))
    tr.save_checkpoint(tmp_path / "a.ckpt")
    back = load_search_model(tmp_path / "a.ckpt")
    x, _ = _data(20, 5)
    m.eval()
    assert torch.equal(back(x), m(x)) and float(back.model.selector.tau) == float(m.model.selector.tau)


def test_selector_targets_outside_the_package_are_refused():
    from ihas_lightning.models.selectors import build_selector

    with pytest.raises(ValueError, match="must be a class under"):
        build_selector({"_target_": "os.system"}, 2, 2, [3, 3])


def test_dlrm_gate_and_selector_are_exclusive():
    from ihas_lightning.models.selectors.autofield import AutoFieldSelector

    with pytest.raises(ValueError, match="either"):
        DLRM(VOCAB, embed_dim=4, gate={"tau": 0.1}, selector=AutoFieldSelector(4, 4, VOCAB))


@pytest.mark.parametrize("backbone", ["mlp", "deepfm", "wide_deep", "dcn"])
def test_a_searched_model_starts_as_base_does(backbone):
    """The selector is built last on a forked random stream: with the same seed, the embedding and the
    backbone of a gated model are Base's to the bit, and the global stream after construction is too."""
    torch.manual_seed(3)
    base = DLRM(VOCAB, embed_dim=4, backbone=backbone)
    after_base = torch.rand(3)
    torch.manual_seed(3)
    gated = DLRM(VOCAB, embed_dim=4, backbone=backbone, gate={"tau": 0.1})
    assert torch.equal(torch.rand(3), after_base)
    want = base.state_dict()
    got = {k: v for k, v in gated.state_dict().items() if not k.startswith("selector.")}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_dense_layers_start_with_zero_biases():
    """FuxiCTR's init: with PyTorch's U(+-1/sqrt(fan_in)) biases a seed could start with every unit of the
    8-wide layer dead (a constant model no gradient leaves); zero biases keep each alive on some rows."""
    torch.manual_seed(0)
    m = DLRM(VOCAB, embed_dim=4)
    linears = [x for x in m.backbone.modules() if isinstance(x, torch.nn.Linear)]
    assert linears and all(torch.count_nonzero(x.bias) == 0 for x in linears)
    x = torch.randint(0, min(VOCAB), (256, len(VOCAB)))
    with torch.no_grad():
        h = m.embedding(x).flatten(1)
        for layer in list(m.backbone.net)[:-1]:
            h = layer(h)
    alive = (h > 0).float().mean(0)  # the last hidden layer's units: each alive on some rows
    assert bool((alive > 0).all())


# ---- every method through stage=all ---------------------------------------------------------------------
PEP_TINY = ["method.max_epochs=2", "method.selector.s_init=-4.0", "method.selector.budgets=[0.9]",
            "method.selector.retrain_budget=0.9"]  # fmt: skip


@pytest.mark.parametrize(
    "name", ["base", "ihas", "adafs_soft", "adafs_hard", "autofield", "optfs", "pep", "optembed"]
)
def test_every_method_runs_stage_all(tmp_path, name):
    from conftest import stage_cfg_factory
    from ihas_lightning import pipeline

    make = stage_cfg_factory(tmp_path)
    extra = {"optfs": ["method.max_epochs=2"], "pep": PEP_TINY,
             "optembed": ["method.selector.population=4", "method.selector.generations=2",
                          "retrain.init=rewind"]}.get(name, [])  # fmt: skip
    pipeline.run(make("stage=all", f"method={name}", *extra))
    res = json.loads((tmp_path / "run" / "evaluate" / "results.json").read_text())
    rows = [r["model"] for r in res["rows"]]
    expect = {
        "base": ["Base"],
        "ihas": ["Base", "iHAS-1", "iHAS (fast routing)", "iHAS"],
        "adafs_soft": ["Base", "AdaFS-soft"],
        "adafs_hard": ["Base", "AdaFS-hard"],
        "autofield": ["Base", "AutoField (search)", "AutoField"],
        "optfs": ["Base", "OptFS (search)", "OptFS"],
        "pep": ["Base", "PEP (search)", "PEP"],
        "optembed": ["Base", "OptEmbed (supernet)", "OptEmbed"],
    }[name]
    assert rows == [*expect, "Constant"]
    assert all(r["inference_ms"] is not None and r["params"] > 0 for r in res["rows"][:-1])
    if name == "autofield":
        arch = json.loads((tmp_path / "run" / "derive" / "arch.json").read_text())
        assert len(arch["kept_fields"]) == 6  # N // 2 of the 12 synthetic fields
        assert res["rows"][-2]["embedding_params"] < res["rows"][0]["embedding_params"]
        assert "derived_vs_truth" in res
    if name == "pep":
        assert (tmp_path / "run" / "search" / "snapshots" / "budget_0.9.pt").is_file()
        arch = json.loads((tmp_path / "run" / "derive" / "arch.json").read_text())
        assert (
            res["rows"][-2]["embedding_params"]
            == arch["kept_entries"]
            <= 0.9 * res["rows"][0]["embedding_params"]
        )
    if name == "optembed":
        arch = json.loads((tmp_path / "run" / "derive" / "arch.json").read_text())
        dims = arch["field_dims"][0]
        assert all(1 <= c <= 16 for c in dims) and len(arch["scores"]["history"]) == 2
        final = res["rows"][-2]
        kept = arch["kept_rows_per_field"]
        assert final["embedding_params"] == sum(k * c for k, c in zip(kept, dims))
    if name == "optfs":
        assert (tmp_path / "run" / "search" / "snapshots" / "epoch_1.pt").is_file()
        arch = json.loads((tmp_path / "run" / "derive" / "arch.json").read_text())
        final = res["rows"][-2]
        assert final["embedding_params"] == arch["kept_rows"] * 16


def test_retrain_init_continue_and_rewind_through_the_stage(tmp_path):
    """optfs with retrain.init=continue starts from the searched weights (kept rows only)."""
    from conftest import stage_cfg_factory
    from ihas_lightning import pipeline
    from ihas_lightning.rundir import load_cluster_models

    make = stage_cfg_factory(tmp_path)
    cfg = make("stage=all", "method=optfs", "method.max_epochs=2", "retrain.init=continue", "retrain.max_epochs=1",
               "stage.train_base=false")  # fmt: skip
    pipeline.run(cfg)
    info = json.loads((tmp_path / "run" / "retrain" / "retrain.json").read_text())
    assert info["init"] == "continue"
    (m,) = load_cluster_models(tmp_path / "run" / "retrain", 1)
    assert m.model.embedding.pruned


def test_defaults_live_in_conf_only():
    """A selector or module built in Python takes its missing knobs from the YAML a run composes."""
    from ihas_lightning.config import group_defaults
    from ihas_lightning.models.selectors.adafs import AdaFSSelector
    from ihas_lightning.models.selectors.autofield import AutoFieldSelector
    from ihas_lightning.models.selectors.bernoulli import BernoulliSelector
    from ihas_lightning.models.selectors.optfs import OptFSSelector

    af = AutoFieldSelector(4, 2, VOCAB)
    y = group_defaults("method", "autofield", "selector")
    assert (af.tau_decay, af.tau_min, float(af.tau)) == (y["tau_decay"], y["tau_min"], y["tau_start"])
    assert (
        OptFSSelector(4, 2, VOCAB).lambda_reg == group_defaults("method", "optfs", "selector")["lambda_reg"]
    )
    assert AdaFSSelector(4, 2, VOCAB).k == 2  # k: null in conf/method/adafs_soft.yaml = N // 2
    g = group_defaults("method", "ihas", "gate")
    b = BernoulliSelector(4, 2, VOCAB)
    assert (b.gate.tau, b.gate.bins, b.lambda_reg) == (g["tau"], g["bins"], g["lambda_reg"])
    m = CTRModule(VOCAB, {"embed_dim": 4})
    assert m.model_cfg["lr"] == group_defaults("model", "mlp")["lr"]


def test_a_knob_that_does_not_fit_the_data_is_a_one_line_error(cfg_factory):
    from ihas_lightning.errors import ConfigError
    from ihas_lightning.stages.search import run

    with pytest.raises(ConfigError, match="method.selector.*12 fields") as e:
        run(cfg_factory("stage=search", "method=autofield", "method.selector.k=13", "dataset.rows=2000"))
    assert "\n" not in str(e.value)


def test_pep_that_never_reaches_its_budget_is_a_one_line_error(tmp_path):
    from conftest import stage_cfg_factory
    from ihas_lightning import pipeline
    from ihas_lightning.errors import DataError

    make = stage_cfg_factory(tmp_path)
    with pytest.raises(DataError, match="never reached the budget") as e:
        pipeline.run(make("stage=all", "method=pep", "stage.train_base=false", "method.max_epochs=1"))
    assert "\n" not in str(e.value)


def test_pep_budget_from_an_ihas_run_dir_becomes_the_retrained_budget(tmp_path):
    from ihas_lightning import method
    from ihas_lightning.config import compose

    run = tmp_path / "ihas_run" / "evaluate"
    run.mkdir(parents=True)
    rows = [{"model": "Base", "embedding_params": 100}, {"model": "iHAS", "embedding_params": 1234}]
    (run / "results.json").write_text(json.dumps({"final_row": "iHAS", "rows": rows}))
    cfg = compose(["method=pep", f"method.budget_from={run.parent}"], output_dir=tmp_path / "o")
    sel = method.spec(cfg, 5)["selector"]
    assert sel["budgets"][-1] == 1234 and sel["retrain_budget"] == 1234
