"""The search's no-harm selection (method.select=sparsest), the NE objective, step-based patience and
the retrain's start kept as a candidate."""

from __future__ import annotations

import itertools
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from ihas_lightning.modules.selection import SparsestSelection, admissible, choose, shortfall
from ihas_lightning.schedule import base_rate_entropy, patience_epochs


# ---- the rule ------------------------------------------------------------------------------------------
def _brute(cands, ref, tol_ne, tol_auc, h0):
    """Every admissible candidate compared with every other: the one no other beats (sparser, then lower
    logloss, then earlier)."""
    ok = [
        c
        for c in cands
        if c["val_logloss"] <= ref["val_logloss"] + tol_ne * h0 and c["val_auc"] >= ref["val_auc"] - tol_auc
    ]
    for c in ok:
        beaten = False
        for o in ok:
            if o is c:
                continue
            t_o = (o["open_share"], o["val_logloss"], o["epoch"])
            t_c = (c["open_share"], c["val_logloss"], c["epoch"])
            if t_o < t_c:
                beaten = True
        if not beaten:
            return c["epoch"]
    return None


class _Trainer:
    """What SparsestSelection reads of a trainer: the epoch, the metrics, the phase and the callbacks."""

    def __init__(self):
        self.current_epoch = 0
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.sanity_checking = False
        self.state = SimpleNamespace(fn="fit")
        self.callbacks: list = []
        self.saved: list[tuple[int, str]] = []

    def save_checkpoint(self, path):
        self.saved.append((self.current_epoch, str(path)))


@pytest.mark.parametrize("seed", range(20))
def test_streaming_selection_matches_the_brute_force_rule(seed, tmp_path):
    rng = random.Random(seed)
    h0 = rng.choice([0.11, 0.47, 0.6])
    tol_ne, tol_auc = rng.choice([(0.0, 0.0), (0.002, 0.001), (0.05, 0.02)])
    pretrain = [(0.5 - 0.01 * e + rng.uniform(0, 0.02), 0.7 + rng.uniform(0, 0.02)) for e in range(3)]
    ref_epoch = min(range(3), key=lambda e: pretrain[e][0])
    cands = [
        {
            "epoch": 3 + i,
            "val_logloss": pretrain[ref_epoch][0] + rng.uniform(-0.01, 0.02),
            "val_auc": pretrain[ref_epoch][1] + rng.uniform(-0.02, 0.01),
            # coarse shares so that ties occur
            "open_share": rng.choice([0.3, 0.4, 0.5, 0.6]),
        }
        for i in range(rng.randint(0, 8))
    ]
    rule = SparsestSelection(tmp_path, tol_ne, tol_auc, h0)
    tr = _Trainer()
    tr.callbacks = [SimpleNamespace(best_epoch=ref_epoch, restore_best=True)]
    # stand-in for SearchSchedule: the rule finds it by type
    from ihas_lightning.modules import search as search_mod

    sched = search_mod.SearchSchedule(3, 1, 10)
    sched.best_epoch = ref_epoch
    tr.callbacks = [sched]
    module = SimpleNamespace(search_start_epoch=None, in_pretrain=lambda e: e < 3)
    for e, (ll, auc) in enumerate(pretrain):
        tr.current_epoch = e
        tr.callback_metrics = {"val/logloss": torch.tensor(ll), "val/auc": torch.tensor(auc)}
        rule.on_validation_end(tr, module)
    module.search_start_epoch = 3
    tr.current_epoch = 3
    rule.on_train_epoch_start(tr, module)
    assert tr.saved == [(3, str(tmp_path / "pretrained.ckpt"))]
    assert rule.reference["epoch"] == ref_epoch
    for c in cands:
        tr.current_epoch = c["epoch"]
        tr.callback_metrics = {
            "val/logloss": torch.tensor(c["val_logloss"], dtype=torch.float64),
            "val/auc": torch.tensor(c["val_auc"], dtype=torch.float64),
            "val/open_share": torch.tensor(c["open_share"], dtype=torch.float64),
        }
        rule.on_validation_end(tr, module)
    ref = {"val_logloss": pretrain[ref_epoch][0], "val_auc": pretrain[ref_epoch][1]}
    want = _brute(cands, ref, tol_ne, tol_auc, h0)
    got = rule.summary()["chosen_epoch"]
    assert got == want
    idx = choose(cands, rule.reference, tol_ne, tol_auc, h0)
    assert (None if idx is None else cands[idx]["epoch"]) == want
    assert rule.fallback == (want is None)
    # best.ckpt was last written at the chosen epoch
    best_saves = [e for e, p in tr.saved if p.endswith("best.ckpt")]
    assert (best_saves[-1] if best_saves else None) == want
    # a validation outside the fit (trainer.validate of the result) is not a candidate
    tr.state.fn = "validate"
    n = len(rule.candidates)
    rule.on_validation_end(tr, module)
    assert len(rule.candidates) == n


def _stop_brute(cands, ref, tol_ne, tol_auc, h0, patience, stop_when):
    """The epoch at which the search stops (None: it runs every candidate), by a plain loop: an epoch is
    progress when it is admissible and sparser (then lower logloss, earlier) than every earlier
    admissible one, or (no_progress, while none was admissible yet) nearer to admissible than every
    earlier epoch; the search stops once `patience` epochs in a row were no progress."""
    wait, best, closest = 0, None, None
    for c in cands:
        excess = c["val_logloss"] - ref["val_logloss"]
        ok = excess <= tol_ne * h0 + 1e-12 and c["val_auc"] >= ref["val_auc"] - tol_auc - 1e-12
        gap = max(excess - tol_ne * h0, (ref["val_auc"] - tol_auc) - c["val_auc"])
        key = (c["open_share"], c["val_logloss"], c["epoch"])
        if ok and (best is None or key < best):
            best, wait = key, 0
        elif stop_when == "no_progress" and best is None and not ok and (closest is None or gap < closest):
            closest, wait = gap, 0
        else:
            wait += 1
            if wait >= patience:
                return c["epoch"]
    return None


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("stop_when", ["no_new_choice", "no_progress"])
def test_the_search_stops_where_the_brute_force_loop_does(seed, stop_when, tmp_path):
    """search.stop_when: the streaming rule sets should_stop at the epoch a plain loop over the finished
    list stops at, and no_progress never stops earlier than no_new_choice."""
    rng = random.Random(seed)
    h0, patience = rng.choice([0.11, 0.47]), rng.choice([1, 2, 3])
    tol_ne, tol_auc = rng.choice([(0.002, 0.001), (0.05, 0.02)])
    pretrain = [(0.5, 0.7), (0.48, 0.71)]
    ref = {"val_logloss": 0.48, "val_auc": 0.71}
    # a search that first costs accuracy and then recovers (noisily), as after the gate's first closing
    cands = [
        {
            "epoch": 2 + i,
            "val_logloss": 0.48 + max(0.0, 0.02 - 0.004 * i) + rng.uniform(-0.003, 0.003),
            "val_auc": 0.71 - max(0.0, 0.01 - 0.002 * i) + rng.uniform(-0.002, 0.002),
            "open_share": rng.choice([0.2, 0.3, 0.5]),
        }
        for i in range(rng.randint(1, 12))
    ]
    stops = {}
    for mode in ("no_new_choice", "no_progress"):
        rule = SparsestSelection(tmp_path, tol_ne, tol_auc, h0, patience=patience, stop_when=mode)
        from ihas_lightning.modules import search as search_mod

        tr = _Trainer()
        sched = search_mod.SearchSchedule(2, 1, 10)
        sched.best_epoch = 1
        tr.callbacks = [sched]
        tr.should_stop = False
        module = SimpleNamespace(search_start_epoch=None, in_pretrain=lambda e: e < 2)
        for e, (ll, auc) in enumerate(pretrain):
            tr.current_epoch = e
            tr.callback_metrics = {"val/logloss": torch.tensor(ll), "val/auc": torch.tensor(auc)}
            rule.on_validation_end(tr, module)
        module.search_start_epoch = tr.current_epoch = 2
        rule.on_train_epoch_start(tr, module)
        stops[mode] = None
        for c in cands:
            tr.current_epoch = c["epoch"]
            tr.callback_metrics = {
                k: torch.tensor(c[n], dtype=torch.float64)
                for k, n in (
                    ("val/logloss", "val_logloss"),
                    ("val/auc", "val_auc"),
                    ("val/open_share", "open_share"),
                )
            }
            rule.on_validation_end(tr, module)
            if tr.should_stop:
                stops[mode] = c["epoch"]
                break
        assert rule.summary()["stop_when"] == mode
    assert stops[stop_when] == _stop_brute(cands, ref, tol_ne, tol_auc, h0, patience, stop_when)
    if stops["no_new_choice"] is not None:
        assert stops["no_progress"] is None or stops["no_progress"] >= stops["no_new_choice"]
    else:
        assert stops["no_progress"] is None


def test_shortfall_is_at_most_zero_exactly_where_an_epoch_is_admissible():
    rng = random.Random(0)
    ref = {"val_logloss": 0.10, "val_auc": 0.70}
    for _ in range(500):
        c = {"val_logloss": 0.10 + rng.uniform(-0.002, 0.002), "val_auc": 0.70 + rng.uniform(-0.004, 0.004)}
        if rng.random() < 0.5:  # the paired bounds, where known, decide
            c["excess_upper"] = c["val_logloss"] - 0.10 + rng.uniform(0, 0.001)
            c["auc_lower"] = c["val_auc"] - 0.70 - rng.uniform(0, 0.002)
        gap = shortfall(c, ref, 0.002, 0.001, 0.11)
        assert (gap <= 1e-12) == admissible(c, ref, 0.002, 0.001, 0.11)
    assert shortfall({"val_logloss": float("nan"), "val_auc": 0.7}, ref, 0.002, 0.001, 0.11) == math.inf


def test_admissible_tolerance_is_in_ne_units():
    ref = {"val_logloss": 0.10, "val_auc": 0.70}
    c = {"val_logloss": 0.1002, "val_auc": 0.70}
    assert admissible(c, ref, 0.002, 0.0, h0=0.11)  # 0.0002 <= 0.002 * 0.11
    assert not admissible(c, ref, 0.002, 0.0, h0=0.05)
    assert not admissible({**c, "val_auc": 0.6989}, ref, 0.002, 0.001, h0=0.11)
    assert not admissible({**c, "val_logloss": float("nan")}, ref, 1.0, 1.0, h0=0.11)


def test_base_rate_entropy_and_step_patience():
    assert base_rate_entropy(0.5) == pytest.approx(math.log(2))
    p = 0.03
    assert base_rate_entropy(p) == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)))
    for pat, bpe, steps in itertools.product([None, 0, 1, 3], [1, 40, 70, 20000], [None, 0, 400]):
        got = patience_epochs(pat, bpe, steps)
        if pat is None:
            assert got is None
            continue
        # the fewest epochs that are >= pat and cover >= steps batches
        want = next(e for e in range(10_000) if e >= pat and e * bpe >= (steps or 0))
        assert got == want


def test_open_all_keeps_every_dim_in_every_mode():
    from ihas_lightning.models.gate import BernoulliGate

    for iw in (True, False):
        g = BernoulliGate(24, instance_wise=iw, input_norm="center" if iw else "none", init_bias=-2.0)
        g.open_all()
        e = torch.randn(64, 24) * 5
        for mode in ("stochastic", "deterministic", "open"):
            mask, p = g(e, mode)
            assert torch.equal(mask, torch.ones_like(mask)), (iw, mode)


# ---- end to end ------------------------------------------------------------------------------------------
SMALL = ["dataset.rows=5000", "model.batch_size=256", "search.search_every=2", "search.patience_steps=0"]


def test_search_falls_back_to_gates_open_when_every_epoch_does_harm(cfg_factory):
    """A regularizer so strong that the gate closes (nearly) everything: no epoch is within tolerance,
    so the selected model is the pretrained one with every gate open (its validation numbers equal the
    reference's) and the search says so."""
    from ihas_lightning.stages.search import run

    cfg = cfg_factory(*SMALL, "search.pretrain.max_epochs=2", "search.pretrain.patience=null",
                      "search.max_epochs=2", "method.gate.lambda_reg=50.0", "method.gate.lr=0.5",
                      "search.tolerance.ne=0", "search.tolerance.auc=0")  # fmt: skip
    m = run(cfg)
    sel = m["sparsest_selection"]
    assert sel["fallback"] == "gates open" and sel["chosen_epoch"] is None
    assert sel["candidates"] and not any(c["admissible"] for c in sel["candidates"])
    # every search epoch is a candidate (the summary is not the restored checkpoint's)
    assert len(sel["candidates"]) == m["epochs_run"] - m["pretrain_epochs"]
    assert m["open_share"] == 1.0
    assert m["val/logloss"] == pytest.approx(sel["reference"]["val_logloss"], abs=1e-6)
    assert m["val/auc"] == pytest.approx(sel["reference"]["val_auc"], abs=1e-6)
    assert "gates open" in m["warnings"][0]
    assert m["budget"]["objective"] == "ne" and 0 < m["budget"]["constant_logloss"] < math.log(2) + 1e-9
    saved = json.load(open(cfg.paths.output_dir + "/search/metrics.json"))
    assert saved["sparsest_selection"]["fallback"] == "gates open"


def test_the_pretrained_reference_is_base_itself(cfg_factory, tmp_path):
    """The pretraining fits every train row (the gate's holdout too) with Base's init, batches and stopping
    rule, so the selection's reference (and fallback) is the Base model: the same validation numbers to the
    last bit. The search phase's model steps then skip the holdout rows."""
    from ihas_lightning.stages.search import run

    small = ["dataset.rows=5000", "model.batch_size=256", "search.patience_steps=0", "search.max_epochs=4",
             "search.patience=1", "trainer.deterministic=true"]  # fmt: skip
    base = run(cfg_factory(*small, "method=base", output_dir=tmp_path / "base"))
    ihas = run(cfg_factory(*small, "search.search_every=2", output_dir=tmp_path / "ihas"))
    ref = ihas["sparsest_selection"]["reference"]
    assert ref["epoch"] == base["best_epoch"]
    assert ref["val_logloss"] == base["val/logloss"] and ref["val_auc"] == base["val/auc"]
    b = ihas["budget"]
    assert b["pretrain_rows"] == base["budget"]["train_rows"] == b["train_rows"] + b["gate_rows"]
    assert b["batch_size"] == base["budget"]["batch_size"]
    assert b["train_positive_rate"] == base["budget"]["train_positive_rate"]


def test_base_from_the_pretraining_is_the_fitted_base(cfg_factory, tmp_path):
    """stage=all takes Base from the search's pretraining instead of fitting it again: the same weights,
    epochs, steps, budget and val/test scores as a fitted Base (no trainer.deterministic needed)."""
    import torch

    from ihas_lightning.pipeline import base_config
    from ihas_lightning.stages.search import base_from_pretraining, pretraining_is_base, run

    small = ["dataset.rows=5000", "model.batch_size=256", "search.patience_steps=0", "search.max_epochs=4",
             "search.patience=1"]  # fmt: skip
    base = run(cfg_factory(*small, "method=base", output_dir=tmp_path / "base"))
    cfg = cfg_factory(*small, "search.search_every=2", output_dir=tmp_path / "ihas")
    run(cfg)
    cb = base_config(cfg)
    assert pretraining_is_base(cfg, cb)
    derived = base_from_pretraining(cb, tmp_path / "ihas" / "search")
    timing = {"fit_seconds", "train_seconds", "samples_per_s", "best_ckpt", "derived_from"}
    assert {k for k in set(base) | set(derived) if base.get(k) != derived.get(k)} <= timing
    assert derived["derived_from"]["search"] == "../../search" and derived["epochs_run"] == 4
    a, b = (torch.load(m["best_ckpt"], weights_only=True) for m in (base, derived))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert (a["epoch"], a["global_step"], a["hyper_parameters"]) == (
        b["epoch"],
        b["global_step"],
        b["hyper_parameters"],
    )
    # a pretraining that is not Base's fit (another patience) is not taken for it
    other = cfg_factory(*small, "search.pretrain.patience=2", output_dir=tmp_path / "other")
    assert not pretraining_is_base(other, base_config(other))


def test_search_selects_the_sparsest_admissible_epoch(cfg_factory):
    from ihas_lightning.stages.search import run

    cfg = cfg_factory(*SMALL, "search.pretrain.max_epochs=1", "search.pretrain.patience=null",
                      "search.max_epochs=3", "search.patience=null", "search.tolerance.ne=0.9",
                      "search.tolerance.auc=0.9")  # fmt: skip
    m = run(cfg)
    sel = m["sparsest_selection"]
    assert all(c["admissible"] for c in sel["candidates"]) and len(sel["candidates"]) == 3
    assert m["epochs_run"] - m["pretrain_epochs"] == 3
    want = min(sel["candidates"], key=lambda c: (c["open_share"], c["val_logloss"], c["epoch"]))
    assert sel["chosen_epoch"] == want["epoch"] == m["best_epoch"]
    # the excess logloss is bounded on the same validation rows, paired with the reference's
    assert sel["tolerance"]["paired"] and sel["tolerance"]["confidence"] == 0.95
    assert sel["tolerance"]["paired_auc"]  # ... and so is the AUC difference (DeLong)
    for c in sel["candidates"]:
        diff = c["val_logloss"] - sel["reference"]["val_logloss"]
        assert c["excess_upper"] > diff - 1e-6
        assert c["auc_lower"] < c["val_auc"] - sel["reference"]["val_auc"] + 1e-4
    assert m["val/logloss"] == pytest.approx(want["val_logloss"], abs=1e-6)


@pytest.mark.parametrize("override", ["search.tolerance.ne=-1", "search.tolerance.auc=2", "method.select=nope",
                                      "method.objective=mse", "search.patience_steps=-3", "search.stop_when=never",
                                      "retrain.patience_steps=x"])  # fmt: skip
def test_bad_selection_keys_are_one_line_errors(cfg_factory, override):
    """A wrong type fails while composing; a wrong value in the stage checks: both name the key."""
    from ihas_lightning.errors import ConfigError
    from ihas_lightning.validate import check_config

    try:
        cfg = cfg_factory("stage=all", override)
    except Exception as e:  # noqa: BLE001 - the schema's type check (the entry point's one line)
        assert override.split("=")[0].split(".")[-1] in str(e)
        return
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        check_config(cfg, trainer=False)


def test_fit_keeps_its_start_when_training_only_hurts(cfg_factory, tmp_path):
    """keep_init: a fit whose every epoch is worse on validation than its start returns the start."""
    from ihas_lightning.data.datamodule import IHASDataModule
    from ihas_lightning.data.dataset_dir import ensure_prepared
    from ihas_lightning.modules.ctr import CTRModule
    from ihas_lightning.training import fit_ctr

    cfg = cfg_factory("dataset.rows=3000", "trainer.threads=1")
    prepared = ensure_prepared(cfg)
    dm = IHASDataModule(str(prepared), batch_size=256)
    vocab = dm.feature_map.vocab_sizes
    model = {
        "embed_dim": 4,
        "hidden": [8],
        "lr": 5.0,
        "weight_decay": 0.0,
        "embedding_optimizer": "sparse_adam",
    }
    torch.manual_seed(0)
    module = CTRModule(vocab, model, output_bias=-1.0)  # near the base rate; lr 5 wrecks it
    res = fit_ctr(module, dm, cfg, tmp_path / "fit", max_epochs=2, patience=None, keep_init=True)
    assert res["best_epoch"] == -1
    torch.manual_seed(0)
    again = CTRModule(vocab, model, output_bias=-1.0)
    plain = fit_ctr(again, dm, cfg, tmp_path / "plain", max_epochs=2, patience=None)
    assert plain["best_epoch"] >= 0 and res["val_logloss"] < plain["val_logloss"]


def test_the_rule_stops_the_search_after_patience_epochs_without_a_new_choice(tmp_path):
    rule = SparsestSelection(tmp_path, 0.0, 0.0, 0.5, patience=2)
    rule.reference = {"epoch": 0, "val_logloss": 0.5, "val_auc": 0.7}
    rule.pretrained_path = "x"
    tr = _Trainer()
    tr.should_stop = False
    module = SimpleNamespace(search_start_epoch=1, in_pretrain=lambda e: e < 1)
    # epoch 1 admissible (chosen), 2 sparser but worse, 3 admissible but denser: two epochs without a choice
    for e, (ll, auc, share) in enumerate([(0.49, 0.71, 0.5), (0.6, 0.6, 0.3), (0.49, 0.72, 0.6)], start=1):
        tr.current_epoch = e
        tr.callback_metrics = {k: torch.tensor(v) for k, v in
                               (("val/logloss", ll), ("val/auc", auc), ("val/open_share", share))}  # fmt: skip
        rule.on_validation_end(tr, module)
        assert tr.should_stop == (e == 3), e
    assert rule.summary()["chosen_epoch"] == 1


def test_excess_upper_is_the_one_sided_paired_bound():
    from statistics import NormalDist

    from ihas_lightning.modules.selection import excess_upper

    g = torch.Generator().manual_seed(0)
    ref = torch.rand(400, generator=g, dtype=torch.float64)
    cand = ref + 0.01 + 0.05 * torch.randn(400, generator=g, dtype=torch.float64)
    d = [float(a - b) for a, b in zip(cand, ref)]
    mean = sum(d) / len(d)
    sd = (sum((x - mean) ** 2 for x in d) / (len(d) - 1)) ** 0.5
    want = mean + NormalDist().inv_cdf(0.95) * sd / len(d) ** 0.5
    assert excess_upper(cand, ref, 0.95) == pytest.approx(want, rel=1e-9)
    assert excess_upper(cand, ref, 0.0) == pytest.approx(mean, rel=1e-9)
    assert excess_upper(cand[:10], ref, 0.95) is None  # not the same rows: the means are compared
    # with the bound, a candidate whose mean is within tolerance but whose bound is not is refused
    c = {"val_logloss": 0.5, "val_auc": 0.7, "excess_upper": 0.003}
    assert not admissible(c, {"val_logloss": 0.5, "val_auc": 0.7}, 0.002, 0.0, h0=1.0)
    assert admissible({**c, "excess_upper": 0.001}, {"val_logloss": 0.5, "val_auc": 0.7}, 0.002, 0.0, h0=1.0)


def test_fit_replaces_its_start_only_when_it_beats_it_with_confidence(cfg_factory, tmp_path):
    """init_confidence: a fit that clearly learns (a near-constant start) replaces the start; with a
    confidence so high that no bound can be below 0 the start is kept."""
    from ihas_lightning.data.datamodule import IHASDataModule
    from ihas_lightning.data.dataset_dir import ensure_prepared
    from ihas_lightning.modules.ctr import CTRModule
    from ihas_lightning.training import fit_ctr

    cfg = cfg_factory("dataset.rows=6000", "trainer.threads=1")
    dm = IHASDataModule(str(ensure_prepared(cfg)), batch_size=256)
    vocab = dm.feature_map.vocab_sizes
    model = {
        "embed_dim": 4,
        "hidden": [8],
        "lr": 1e-2,
        "weight_decay": 0.0,
        "embedding_optimizer": "sparse_adam",
    }
    torch.manual_seed(0)
    res = fit_ctr(CTRModule(vocab, model, output_bias=-1.0), dm, cfg, tmp_path / "a", max_epochs=3,
                  patience=None, keep_init=True, init_confidence=0.95)  # fmt: skip
    assert res["best_epoch"] >= 0
    torch.manual_seed(0)
    res = fit_ctr(CTRModule(vocab, model, output_bias=-1.0), dm, cfg, tmp_path / "b", max_epochs=1,
                  patience=None, keep_init=True, init_confidence=1 - 1e-15)  # fmt: skip
    assert res["best_epoch"] == -1


def test_a_cluster_too_rare_to_judge_keeps_its_start(cfg_factory):
    """At a 3% base rate on 4k rows each cluster's validation rows hold a handful of positives: fewer than
    retrain.min_class_rows, so no cluster model is trained and iHAS routes to the narrowed searched model."""
    from ihas_lightning import pipeline

    cfg = cfg_factory("stage=all", "dataset=synthetic_ctr3", "dataset.rows=4000", "model.batch_size=256",
                      "search.max_epochs=2", "search.pretrain.max_epochs=1", "search.pretrain.patience=null",
                      "search.search_every=2", "evaluate.timing_repeats=1", "stage.train_base=false")  # fmt: skip
    pipeline.run(cfg)
    out = cfg.paths.output_dir
    r = json.load(open(f"{out}/retrain/retrain.json"))
    for c in r["clusters"]:
        assert c["kept_start"] and "retrain.min_class_rows=10" in c["kept_start"]
        assert c["best_epoch"] == -1 and c["epochs_run"] == 0


def test_auc_lower_is_the_one_sided_delong_bound_and_refuses_noise():
    """The AUC side of admissibility is a paired non-inferiority test: the one-sided DeLong lower bound
    of AUC(candidate) - AUC(reference) on the same rows. A candidate far *above* the reference on a
    handful of positives (the criteo-ctr1 seed-4 case) is not proof; the same gap on many rows is."""
    from statistics import NormalDist

    from ihas_lightning.modules.selection import auc_lower
    from ihas_lightning.stats import paired_auc_difference

    def rows(n, pos, seed, shift):
        g = torch.Generator().manual_seed(seed)
        y = torch.zeros(n, dtype=torch.float64)
        y[torch.randperm(n, generator=g)[:pos]] = 1.0
        ref = torch.randn(n, generator=g, dtype=torch.float64) + y
        cand = ref + shift * y + 0.8 * torch.randn(n, generator=g, dtype=torch.float64)
        loss = torch.zeros(n, dtype=torch.float64)
        return torch.stack([loss, cand, y], 1), torch.stack([loss, ref, y], 1)

    c, r = rows(400, 8, 1, 0.3)
    d = paired_auc_difference(c[:, 2].numpy(), c[:, 1].numpy(), r[:, 1].numpy())
    from scipy.stats import t

    assert 6.0 < d["df"] < 12.0  # the 8 positives' term dominates the variance
    want = d["diff"] - t.ppf(0.95, d["df"]) * d["se"]  # a t bound: wider than the normal one
    assert auc_lower(c, r, 0.95) == pytest.approx(want, rel=1e-12)
    assert want < d["diff"] - NormalDist().inv_cdf(0.95) * d["se"]
    assert auc_lower(c, r, 0.0) == pytest.approx(d["diff"], rel=1e-12)
    ref = {"val_logloss": 0.05, "val_auc": 0.70}
    small = {"val_logloss": 0.05, "val_auc": 0.70 + d["diff"], "auc_lower": auc_lower(c, r, 0.95)}
    assert d["diff"] > 0 and small["auc_lower"] < -0.001  # higher mean, wide bound: refused
    assert not admissible(small, ref, 1.0, 0.001, h0=0.05)
    c, r = rows(200_000, 20_000, 1, 0.5)  # the same kind of gap, proven
    big = {"val_logloss": 0.05, "val_auc": 0.71, "auc_lower": auc_lower(c, r, 0.95)}
    assert big["auc_lower"] > 0 and admissible(big, ref, 1.0, 0.001, h0=0.05)
    # not the same rows, no scores (1-d losses), or one class only: None, the means decide
    assert auc_lower(c[:10], r, 0.95) is None and auc_lower(c[:, 0], r[:, 0], 0.95) is None
    one = r.clone()
    one[:, 2] = 0.0
    assert auc_lower(one, one, 0.95) is None
    assert admissible({**big, "auc_lower": None}, ref, 1.0, 0.001, h0=0.05)


def test_a_resumed_rule_names_the_files_of_its_own_run_dir(tmp_path):
    """A run dir moved between the kill and the resume: the fallback's weights are read from where the
    run dir is now, not from the path the checkpoint recorded."""
    old = SparsestSelection(tmp_path / "a", 0.0, 0.0, 0.5)
    old.pretrained_path, old.best_model_path = str(tmp_path / "a" / "pretrained.ckpt"), ""
    new = SparsestSelection(tmp_path / "moved", 0.0, 0.0, 0.5)
    new.load_state_dict(old.state_dict())
    assert new.pretrained_path == str(tmp_path / "moved" / "pretrained.ckpt") and new.best_model_path == ""
