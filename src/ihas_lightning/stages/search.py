"""``stage=search``: the iHAS searching stage (paper Algorithm 1), or the Base model with ``method=base``.

``run(cfg)`` wires: prepared data (``ensure_prepared``) -> ``IHASDataModule`` -> ``SearchModule``
(``method=ihas``) or ``CTRModule`` (``method=base``, same code path without gates) -> a Trainer
built from ``cfg.trainer`` -> fit -> validate/test the best checkpoint -> outputs.

Budgets (:mod:`ihas_lightning.schedule`, :mod:`ihas_lightning.training`): the batch size and the
gate schedule follow the data size (``model.batch_size=auto``, ``search.search_every=auto``); the
output bias starts at the training rows' log-odds (``model.output_bias=prior``). Base trains up to
``search.max_epochs``, early-stopped on ``search.monitor`` (``val/logloss``) with
``search.patience``. A search pretrains with open gates until ``search.pretrain.patience`` epochs
bring no improvement (at most ``search.pretrain.max_epochs``), restores the best pretrained weights,
then runs the bi-level search for at most ``search.max_epochs`` epochs, early-stopped alike; the
model's lr is scaled by ``search.model_lr_scale`` in that phase.

The gate's data (``search.gate_data``): ``holdout`` (default) holds a seeded
``search.holdout_fraction`` of the TRAIN rows out of the model's training and feeds them to the gate
steps, so the validation split used for early stopping and checkpoint selection is never fitted by
the gate (on a sample the gate, N*d x N*d weights, memorises a small validation split: val AUC 0.9999,
test AUC 0.67 on the Criteo sample); ``val`` is the paper's protocol (``experiment=paper_protocol``).

Outputs in ``<run dir>/search/``::

    best.ckpt      the best model by search.monitor (deterministic masks), search-phase epochs only
    last.ckpt      the last epoch (for ``search.resume=<ckpt>``)
    metrics.json   val + test AUC/logloss of best.ckpt, the resolved budget (batch size, gate
                   schedule, epochs), open-dim shares (overall / per field / per dim) and
                   polarization statistics on the test split, timing and samples/s, warnings
                   (too few gate steps, nothing or everything closed, no bimodal histogram) and
                   (synthetic data) per-group field recovery against truth.json
    gate_hist.png  histogram of the gate probabilities on the test split (paper Figure 3)
    manifest.json  written last: config hashes, the prepared dir and its feature-map hash

Model selection (ModelCheckpoint and EarlyStopping on ``search.monitor``) ignores the pretraining epochs,
whose validation runs with open gates: otherwise the best checkpoint could be a pretrain-only
model whose gates were never trained. If no phase-2 validation ran (``fast_dev_run``, or a budget
that ends inside pretraining) ``best.ckpt`` holds the final weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from .. import method
from ..distributed import barrier, global_rank, is_global_zero, world_size
from ..errors import ConfigError, DataError
from ..method import check_gate_cfg  # noqa: F401 - re-exported for callers of the stage
from ..rundir import BEST, LAST, STARTED, checkpoint_epoch, load_search_model, loader_kwargs  # noqa: F401 - re-exported
from ..utils import seed_everything, stable_hash, write_json

log = logging.getLogger("ihas_lightning")

SEARCH_DIR = "search"
MANIFEST_KEYS = ["seed", "dataset", "model", "method", "search", "trainer"]


# ---- module construction ----------------------------------------------------------------------------
def build_module(
    cfg: DictConfig,
    feature_map,
    output_bias: float | None = None,
    search_every: int = 100,
    constant_logloss: float | None = None,
):
    """The :class:`SearchModule` of ``cfg.method`` (Base: no selector)."""
    from ..modules.search import SearchModule

    pre = method.pretrain(cfg)
    sel = method.has_selector(cfg)
    # patience null (or no pretraining): exactly pretrain.max_epochs epochs; else the SearchSchedule
    # callback ends the pretraining on its validation criterion
    fixed = pre.get("patience") is None or int(pre.max_epochs) == 0
    return SearchModule(
        feature_map.vocab_sizes,
        method.model_cfg(cfg),
        pretrain_epochs=int(pre.max_epochs) if (fixed or not sel) else None,
        search_every=int(search_every),
        field_names=feature_map.field_names,
        output_bias=output_bias,
        model_lr_scale=float(method.setting(cfg, "model_lr_scale")),
        method=method.spec(cfg, int(method.setting(cfg, "max_epochs"))),
        constant_logloss=constant_logloss,
    )


# ---- outputs --------------------------------------------------------------------------------------------
def _group_batches(dm, split: str, batches: list[int]):
    """Per-batch slices of the ``_group`` column aligned with an ordered pass over ``split``."""
    groups = np.array(dm.extra_column(split, "_group"))
    start = 0
    for n in batches:
        yield torch.as_tensor(groups[start : start + n])
        start += n


def _test_gate_statistics(module, dm, synthetic: bool) -> dict[str, Any]:
    batches = [
        (torch.as_tensor(b[0]), torch.as_tensor(b[1])) for b in dm.split_dataloader("test", shuffle=False)
    ]
    groups = _group_batches(dm, "test", [len(b[1]) for b in batches]) if synthetic else None
    return module.gate_statistics(batches, groups)


def _metric(d: list[dict], key: str) -> float | None:
    for m in d:
        if key in m:
            return float(m[key])
    return None


GATE_DATA = ("holdout", "val")
PRETRAINING = "pretraining.json"  # what the pretraining did (SearchSchedule), for a Base derived from it
OUTPUT_BIAS = ("prior", "zero")


def manifest_parents(cfg: DictConfig, prepared: Path) -> dict[str, Any]:
    """What a search output depends on besides its config: the data, and a transferred selector's source."""
    parents: dict[str, Any] = {"prepared_dir": prepared}
    if method.transferring(cfg):
        parents["transfer_ckpt"] = method.transfer_ckpt(cfg)
    return parents


def _load_transfer(cfg: DictConfig, module, fmap) -> dict[str, Any]:
    """Transfer: the source search's embedding tables and (frozen) selector into ``module``."""

    ckpt = method.transfer_ckpt(cfg)
    source = load_search_model(ckpt, fmap)  # one-line DataError when it does not fit the data
    want = str(cfg.method.selector._target_)
    got = str(((source.hparams.get("method") or {}).get("selector") or {}).get("_target_"))
    if got != want:
        raise DataError(f"{ckpt}: its selector is {got}, not this method's {want} (transfer.from)")
    try:
        keys = module.load_transfer(source.model)
    except ValueError as e:
        raise DataError(f"{ckpt}: {e} (transfer.from)") from None
    log.info("search: transfer from %s (%d tensors: embedding + frozen selector); backbone %s trained fresh",
             ckpt, len(keys), cfg.model.backbone)  # fmt: skip
    return {"from": str(ckpt.resolve()), "source_backbone": source.model.backbone_name}


def check_backbone(model: DictConfig) -> None:
    """``model.backbone`` names a registered backbone and ``model.backbone_args`` are its knobs
    (built once on a stand-in shape)."""
    from ..models.backbones import BACKBONES, build_backbone

    name = model.get("backbone")
    if name not in BACKBONES:
        raise ConfigError(f"config key 'model.backbone': must be one of {sorted(BACKBONES)} (got {name!r})")
    args = model.get("backbone_args") or {}
    args = dict(OmegaConf.to_container(args, resolve=True)) if not isinstance(args, dict) else dict(args)
    import inspect

    # the backbones take the shared model keys as **kwargs, so an unknown knob would be ignored
    shared = (
        "self",
        "field_dims",
        "_",
        "hidden",
        "batchnorm",
        "dropout",
        "embed_dim",
        "vocab_sizes",
        "positions",
    )
    own = [p for p in inspect.signature(BACKBONES[name]).parameters if p not in shared]
    for key in args:
        if key not in own:
            raise ConfigError(
                f"config key 'model.backbone_args.{key}': {name} has no such argument (its own: "
                f"{', '.join(own) or 'none'}; the shared ones are model.hidden, model.dropout, ...)"
            )
    try:
        build_backbone(str(name), [2, 2], vocab_sizes=[3, 3], embed_dim=2, hidden=(2,), **args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'model.backbone_args': {name}: {e}") from None


def check_cfg(cfg: DictConfig) -> None:
    """Every key the search stage (and the Base fit) will use, checked before any work."""
    from .. import schedule
    from ..training import MONITORS, check_fit_cfg, check_monitor

    sc = cfg.search
    check_fit_cfg(sc, "search")
    schedule.check_batch_size(cfg.model)
    ob = cfg.model.output_bias
    if ob not in OUTPUT_BIAS:
        raise ConfigError(f"config key 'model.output_bias': must be one of {list(OUTPUT_BIAS)} (got {ob!r})")
    check_backbone(cfg.model)
    method.check(cfg)
    if not method.has_selector(cfg):
        return
    check_fit_cfg(sc.pretrain, "search.pretrain", min_epochs=0)  # 0: no pretraining
    check_monitor(sc.get("search_monitor"), "search.search_monitor", MONITORS)
    schedule.check_search_every(sc)
    if sc.gate_data not in GATE_DATA:
        raise ConfigError(
            f"config key 'search.gate_data': must be one of {list(GATE_DATA)} (got {sc.gate_data!r})"
        )
    frac = sc.get("holdout_fraction")
    if not isinstance(frac, (int, float)) or not 0.0 < float(frac) < 1.0:
        raise ConfigError(f"config key 'search.holdout_fraction': must be in (0, 1) (got {frac!r})")
    scale = sc.get("model_lr_scale")
    if not isinstance(scale, (int, float)) or float(scale) <= 0:
        raise ConfigError(f"config key 'search.model_lr_scale': must be > 0 (got {scale!r})")
    for key in ("ne", "auc", "confidence"):
        v = (sc.get("tolerance") or {}).get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= float(v) < 1.0:
            raise ConfigError(f"config key 'search.tolerance.{key}': must be a number in [0, 1) (got {v!r})")
    from ..modules.selection import STOP_WHEN

    if sc.get("stop_when") not in STOP_WHEN:
        raise ConfigError(
            f"config key 'search.stop_when': must be one of {list(STOP_WHEN)} (got {sc.get('stop_when')!r})"
        )
    ps = sc.get("patience_steps")
    if ps is not None and (not isinstance(ps, int) or isinstance(ps, bool) or ps < 0):
        raise ConfigError(f"config key 'search.patience_steps': must be an integer >= 0 or null (got {ps!r})")
    mg = sc.get("min_gate_steps")
    if not isinstance(mg, int) or mg < 0:
        raise ConfigError(f"config key 'search.min_gate_steps': must be an integer >= 0 (got {mg!r})")
    sbs = sc.get("search_batch_size")
    if sbs is not None and (not isinstance(sbs, int) or sbs < 1):
        raise ConfigError(f"config key 'search.search_batch_size': must be >= 1 or null (got {sbs!r})")


def holdout_mask(rows: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded bool mask over the train rows (file order): the gate's held-out rows."""
    mask = np.random.default_rng([int(seed), 0x6A7E]).random(rows) < float(fraction)
    if rows >= 2 and not mask.any():
        mask[0] = True
    if rows >= 2 and mask.all():
        mask[0] = False
    return mask


def search_warnings(metrics: dict[str, Any], min_gate_steps: int) -> list[str]:
    """One-line warnings for a search that did not select (also written to metrics.json)."""
    out = []
    steps = metrics.get("gate_steps", 0)
    if steps < min_gate_steps:
        out.append(
            f"the gate made only {steps} steps (< search.min_gate_steps={min_gate_steps}): too few to learn "
            f"a selection; lower search.search_every or raise search.max_epochs"
        )
    share = metrics.get("open_share")
    if share is not None and share >= 0.99:
        out.append(f"the search closed nothing: {share:.1%} of the dims are open on the test split")
    elif share is not None and share <= 0.01:
        out.append(f"the search closed everything: {share:.1%} of the dims are open on the test split")
    valley = (metrics.get("gate") or {}).get("polarization", {}).get("share_valley_found")
    if valley is not None and valley < 0.5:
        out.append(
            f"the gate histogram is not bimodal for {1 - valley:.0%} of the test samples (no valley: their "
            f"threshold is 0.5, as under method.gate.threshold=half)"
        )
    return out


@dataclass
class _Plan:
    """What the search stage derives before its fit: the run dir, the data, the budget."""

    out_root: Path
    out: Path
    zero: bool
    prepared: Path
    resume: str | None
    fmap: Any = None
    dm: Any = None
    hold: np.ndarray | None = None
    n_train: int = 0
    model_rows: int = 0
    bs: int = 0
    sbs: int = 0
    bpe: int = 0
    bpe_all: int = 0
    prior: float = 0.0
    synthetic: bool = False
    budget: dict[str, Any] = field(default_factory=dict)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train the search model of ``cfg.method`` (Base: the plain model) and write ``search/`` outputs;
    returns the metrics dict."""
    from ..loggers import build_logger, finish_loggers

    check_cfg(cfg)
    plan = _start(cfg)
    seed_everything(int(cfg.seed))
    _load_data(cfg, plan)
    module, bias, h0, transfer = _build(cfg, plan)
    logger = build_logger(cfg, str(cfg.get("tag") or "search"))
    try:
        trainer, ckpt_cb, throughput, fit = _fit(cfg, plan, module, h0, logger)
        best, selection = _select(cfg, plan, trainer, module, ckpt_cb)
        val = trainer.validate(
            module, dataloaders=plan.dm.val_dataloader(), ckpt_path=str(best), verbose=False
        )
        test = trainer.test(module, dataloaders=plan.dm.test_dataloader(), ckpt_path=str(best), verbose=False)
        samples_all = None
        if world_size() > 1:  # every rank's training samples: each row once per epoch (trainer=ddp)
            samples_all = trainer.strategy.reduce(torch.tensor(float(throughput.samples)), reduce_op="sum")
        if not plan.zero:
            barrier()  # rank 0 writes metrics.json and the manifest
            return {"rank": global_rank(), "train_samples": throughput.samples}
        metrics = _metrics(cfg, plan, trainer, module, best, val, test, throughput, fit)
        metrics["transfer"] = transfer
        metrics["budget"].update(train_positive_rate=plan.prior, output_bias=bias)
        if selection is not None:
            metrics["sparsest_selection"] = selection
            metrics["selection_note"] = (
                "best_epoch is the selected search epoch; the fallback's weights are the pretrained ones"
            )
        if method.has_selector(cfg):
            _selector_metrics(metrics, plan, module, fit["gate_steps"])
        if module.model.gate is not None:
            _gate_metrics(cfg, plan, module, metrics, fit["gate_steps"], selection)
        if samples_all is not None:
            metrics["train_samples_all_ranks"] = int(samples_all)
            metrics["world_size"] = world_size()
        write_json(plan.out / "metrics.json", metrics)
        _write_manifest(cfg, plan.out, plan.prepared, plan.fmap, best)
        barrier()
        log.info(
            "search (%s) done: best epoch %s of %s, val/auc=%s test/auc=%s (%s)",
            metrics["method"],
            metrics["best_epoch"],
            metrics["epochs_run"] + 1,
            _round(metrics["val/auc"]),
            _round(metrics["test/auc"]),
            plan.out / "metrics.json",
        )
        return metrics
    finally:
        finish_loggers()


def _start(cfg: DictConfig) -> _Plan:
    """The run dir (a previous run's completion markers dropped), the prepared data, ``started.json``."""
    from ..data.dataset_dir import ensure_prepared

    resume = cfg.search.get("resume")
    if resume and not Path(str(resume)).is_file():
        raise DataError(f"{resume}: checkpoint to resume from not found (search.resume)")
    out_root = Path(str(cfg.paths.output_dir))
    out = out_root / SEARCH_DIR
    out.mkdir(parents=True, exist_ok=True)
    zero = is_global_zero()  # trainer=ddp: rank 0 writes the stage's files, the others wait for them
    # the manifest marks a complete search dir: drop a previous run's before writing anything new
    for stale in ("manifest.json", "metrics.json", PRETRAINING):
        if zero:
            (out / stale).unlink(missing_ok=True)
    prepared = Path(ensure_prepared(cfg))
    if not resume and zero:
        from ..artifacts import make_manifest

        start = make_manifest("search", cfg, MANIFEST_KEYS, parents=manifest_parents(cfg, prepared))
        write_json(out / STARTED, {k: start[k] for k in ("stage", "config_hash", "parents", "created")})
    return _Plan(out_root, out, zero, prepared, str(resume) if resume else None)


def _load_data(cfg: DictConfig, plan: _Plan) -> None:
    """The feature map, the gate's holdout, Base's batch size and the DataModule (phased when holdout)."""
    from .. import schedule
    from ..data.datamodule import IHASDataModule
    from ..data.feature_map import FeatureMap
    from ..data.phased import PhasedTrainData

    sc = cfg.search
    plan.fmap = FeatureMap.load(plan.prepared)
    plan.n_train = n_train = plan.fmap.rows("train")
    if method.arch_update(cfg) == "bilevel" and sc.gate_data == "holdout":
        plan.hold = holdout_mask(n_train, float(sc.holdout_fraction), int(cfg.seed))
    plan.model_rows = n_train - (int(plan.hold.sum()) if plan.hold is not None else 0)
    # the batch size of Base's fit (every train row): the pretraining is that fit, exactly
    plan.bs = bs = schedule.batch_size(cfg.model, n_train)
    plan.sbs = int(sc.get("search_batch_size") or bs)
    eval_bs = int(cfg.evaluate.get("batch_size") or bs)
    data_kw = dict(batch_size=bs, eval_batch_size=eval_bs, seed=int(cfg.seed), search_batch_size=plan.sbs)
    prepared = str(plan.prepared)
    if plan.hold is None:
        plan.dm = IHASDataModule(prepared, **data_kw, **loader_kwargs(cfg))
    else:  # pretraining on every row (= Base), the search phase's model steps outside the holdout
        search_rows = IHASDataModule(
            prepared, **data_kw, row_filter={"train": ~plan.hold}, **loader_kwargs(cfg)
        )
        plan.dm = PhasedTrainData(prepared, search_rows=search_rows, **data_kw, **loader_kwargs(cfg))
    plan.bpe = schedule.batches_per_epoch(plan.model_rows, bs)
    plan.bpe_all = schedule.batches_per_epoch(n_train, bs)
    plan.prior = plan.dm.positive_rate("train")
    plan.synthetic = (plan.prepared / "truth.json").is_file()
    plan.budget = {"batch_size": bs, "train_rows": plan.model_rows, "batches_per_epoch": plan.bpe}
    if plan.hold is not None:
        plan.budget.update(pretrain_rows=n_train, pretrain_batches_per_epoch=plan.bpe_all)


def _build(cfg: DictConfig, plan: _Plan):
    """The LightningModule (its output bias, the NE objective's unit, a transferred gate, the gate's
    data): (module, output bias, constant logloss h0, transfer info)."""
    from .. import schedule

    sel, bilevel = method.has_selector(cfg), method.arch_update(cfg) == "bilevel"
    every = method.search_every(cfg, plan.bpe) if bilevel else None
    bias = schedule.prior_logit(plan.prior) if cfg.model.output_bias == "prior" else None
    h0 = schedule.base_rate_entropy(plan.prior)
    try:
        module = build_module(
            cfg, plan.fmap, output_bias=bias, search_every=every or 100, constant_logloss=h0
        )
    except ValueError as e:  # a knob that does not fit this dataset (e.g. k > its field count)
        raise ConfigError(
            f"config key 'method.selector': {e} (dataset {cfg.dataset.name}: {plan.fmap.num_fields} fields)"
        ) from None
    transfer = _load_transfer(cfg, module, plan.fmap) if method.transferring(cfg) else None
    module.snapshot_dir = plan.out / "snapshots"
    budget = plan.budget
    if sel:
        budget["arch_update"] = method.arch_update(cfg)
        budget["embedding_optimizer"] = module.model_cfg["embedding_optimizer"]
        # derived from the data (logged): the unit of the NE objective and of the selection tolerance
        budget["objective"] = module.objective
        budget["constant_logloss"] = round(h0, 6) if h0 is not None else None
    if bilevel:
        _attach_gate_data(cfg, plan, module)
        budget.update(search_every=every, gate_data=str(cfg.search.gate_data), search_batch_size=plan.sbs)
    log.info("search (%s): %s", cfg.method.name, ", ".join(f"{k}={v}" for k, v in budget.items()))
    return module, bias, h0, transfer


def _attach_gate_data(cfg: DictConfig, plan: _Plan, module) -> None:
    """The gate steps' loader: the train holdout (default) or the validation split (the paper's)."""
    from ..data.datamodule import IHASDataModule

    if plan.hold is not None:
        gate_dm = IHASDataModule(
            str(plan.prepared),
            batch_size=plan.sbs,
            seed=int(cfg.seed),
            search_batch_size=plan.sbs,
            row_filter={"train": plan.hold},
            **loader_kwargs(cfg),
        )
        module.set_search_loader(lambda: gate_dm.search_dataloader("train"))  # built in the fit
        plan.budget["gate_rows"] = int(plan.hold.sum())
    else:
        module.set_search_loader(lambda: plan.dm.search_dataloader("val"))  # built in the fit
        plan.budget["gate_rows"] = plan.fmap.rows("val")


def _monitor(cfg: DictConfig) -> str:
    """Base and the pretraining: search.monitor; the search phase: the method's search monitor."""
    return str(method.setting(cfg, "search_monitor")) if method.has_selector(cfg) else str(cfg.search.monitor)


def _is_sparsest(cfg: DictConfig) -> bool:
    return method.has_selector(cfg) and cfg.method.select == "sparsest" and not method.transferring(cfg)


def _fit(cfg: DictConfig, plan: _Plan, module, h0, logger):
    """The callbacks (selection, early stopping, the pretrain/search schedule), the Trainer and the fit:
    (trainer, the selection callback, the throughput callback, {gate_steps, fit_seconds, max_epochs})."""
    from .. import schedule
    from ..modules.search import SearchSchedule
    from ..training import build_trainer, selection_callbacks, throughput_callback

    sc, budget = cfg.search, plan.budget
    search_epochs = int(method.setting(cfg, "max_epochs"))
    steps = sc.get("patience_steps")
    budget["patience"] = patience = _patience(cfg, plan)
    rule = sparsest_rule(cfg, plan.out, h0)
    callbacks, ckpt_cb = selection_callbacks(plan.out, _monitor(cfg), patience, sparsest=rule)
    throughput = throughput_callback()
    callbacks.append(throughput)
    max_epochs = search_epochs
    if method.has_selector(cfg):
        pre = method.pretrain(cfg)
        pre_patience = schedule.patience_epochs(pre.get("patience"), plan.bpe_all, steps)
        callbacks.insert(
            0,
            SearchSchedule(
                pretrain_max_epochs=int(pre.max_epochs),
                pretrain_patience=budget.setdefault("pretrain_patience", pre_patience),
                search_max_epochs=search_epochs,
                monitor=str(sc.monitor),
                restore_best=bool(pre.get("restore_best", True)),
                record=plan.out / PRETRAINING if _is_sparsest(cfg) else None,
            ),
        )
        max_epochs = int(pre.max_epochs) + search_epochs
    # PhasedTrainData: the train loader is re-read each epoch (the rows change with the phase)
    reload = {"reload_dataloaders_every_n_epochs": 1} if plan.hold is not None else {}
    trainer = build_trainer(cfg, max_epochs, callbacks, logger, plan.out_root, **reload)
    # the train loader's shuffle is seeded by the trainer's epoch (also when resuming mid-run)
    plan.dm.trainer = trainer
    t0 = time.perf_counter()
    # the loaders are built by the fit (datamodule=): under trainer=ddp each rank's shard is known then
    trainer.fit(module, datamodule=plan.dm, ckpt_path=plan.resume)
    fit = {"fit_seconds": time.perf_counter() - t0, "max_epochs": max_epochs}
    fit["gate_steps"] = int(module.gate_steps)  # loading best.ckpt later restores its count
    return trainer, ckpt_cb, throughput, fit


def _patience(cfg: DictConfig, plan: _Plan) -> int | None:
    """The fit's early-stopping patience in epochs (derived from the data: ``search.patience_steps``)."""
    from .. import schedule

    patience = method.setting(cfg, "patience") if bool(cfg.method.early_stop) else None
    return schedule.patience_epochs(patience, plan.bpe, cfg.search.get("patience_steps"))


def _select(cfg: DictConfig, plan: _Plan, trainer, module, ckpt_cb):
    """The checkpoint the stage hands on (``best.ckpt``; the gates-open fallback of the sparsest rule;
    the last epoch with ``method.select=last``) and ``last.ckpt``: (best path, the rule's summary)."""
    sparsest = _is_sparsest(cfg)
    if sparsest and ckpt_cb.fallback:
        _select_gates_open(trainer, module, ckpt_cb, plan.out)
    # before validate(ckpt_path=best), which restores the callbacks' state of that checkpoint
    selection = ckpt_cb.summary() if sparsest else None
    best = Path(ckpt_cb.best_model_path) if ckpt_cb.best_model_path else None
    # trainer=ddp: every rank takes rank 0's decisions (each save below is collective, and rank 0
    # writes the file right after deciding)
    select_last = cfg.method.select == "last"
    no_best, no_last = trainer.strategy.broadcast(
        (select_last or best is None or not best.is_file(), not (plan.out / LAST).is_file())
    )
    if no_best:
        # the method derives from its last epoch (OptFS), or no selectable validation ran
        best = plan.out / BEST
        trainer.save_checkpoint(best)
    if no_last:
        trainer.save_checkpoint(plan.out / LAST)
    return best, selection


def _metrics(cfg: DictConfig, plan: _Plan, trainer, module, best: Path, val, test, throughput, fit):
    """metrics.json's common part: the scores of ``best``, the selection, the budget, the timing."""
    monitor = _monitor(cfg)
    if cfg.method.select == "last":
        selection = "last epoch"
    else:
        selection = (
            "sparsest within search.tolerance of gates open" if _is_sparsest(cfg) else f"best {monitor}"
        )
    secs = throughput.seconds
    return {
        "method": str(cfg.method.name),
        "backbone": str(cfg.model.backbone),
        "transfer": None,
        "dataset": str(cfg.dataset.name),
        "val/auc": _metric(val, "val/auc"),
        "val/logloss": _metric(val, "val/logloss"),
        "test/auc": _metric(test, "test/auc"),
        "test/logloss": _metric(test, "test/logloss"),
        "monitor": monitor,
        "selection": selection,
        "best_epoch": checkpoint_epoch(best),
        "epochs_run": int(trainer.current_epoch),
        "pretrain_epochs": module.search_start_epoch if method.has_selector(cfg) else 0,
        "budget": {**plan.budget, "max_epochs": fit["max_epochs"]},
        "global_step": int(trainer.global_step),
        "global_step_note": "counts optimizer steps: 2 per training batch, 3 on architecture-step batches",
        "fit_seconds": round(fit["fit_seconds"], 3),
        "train_seconds": round(secs, 3),
        "train_samples": throughput.samples,
        "samples_per_s": round(throughput.samples / secs, 1) if secs else None,
        "num_parameters": int(module.model.num_parameters()),
        "parameter_counts": module.model.parameter_counts(),
        "best_ckpt": str(best),
    }


def _selector_metrics(metrics: dict[str, Any], plan: _Plan, module, gate_steps: int) -> None:
    metrics["arch_steps"] = gate_steps
    metrics["selector"] = module.model.selector.statistics()
    snaps = sorted(p.name for p in (plan.out / "snapshots").glob("*.pt"))
    if snaps:
        metrics["snapshots"] = snaps


def _gate_metrics(cfg: DictConfig, plan: _Plan, module, metrics: dict[str, Any], gate_steps: int, selection):
    """The gate's statistics on the test split, its histogram (Figure 3), the planted recovery
    (synthetic data) and the search's warnings."""
    from ..report.figures import gate_histogram_png

    metrics["gate_steps"] = gate_steps
    metrics["gate_steps_at_best"] = int(module.gate_steps)
    stats = _test_gate_statistics(module, plan.dm, plan.synthetic)
    hist = stats.pop("p_hist")
    metrics["gate"] = {k: v for k, v in stats.items() if k not in ("per_group_field_mask", "group_samples")}
    metrics["gate"]["p_hist"] = hist
    metrics["open_share"] = stats["open_share"]
    metrics["open_share_per_field"] = stats["open_share_per_field"]
    gate = cfg.method.gate
    title = (
        f"gate probabilities, test split ({cfg.method.name}, lambda={gate.lambda_reg}, "
        f"polarization={'on' if gate.polarization else 'off'})"
    )
    gate_histogram_png(
        hist, plan.out / "gate_hist.png", title=title, threshold=stats["polarization"]["mean_threshold"]
    )
    if plan.synthetic and "per_group_field_mask" in stats:
        from ..report.recovery import field_recovery
        from ..utils import read_json

        truth = read_json(plan.prepared / "truth.json")
        metrics["per_group_field_mask"] = stats["per_group_field_mask"]
        metrics["recovery"] = field_recovery(stats["per_group_field_mask"], truth)
    metrics["warnings"] = search_warnings(metrics, int(cfg.search.min_gate_steps))
    if selection is not None and selection["fallback"]:
        ref = selection["reference"] or {}
        metrics["warnings"].insert(
            0,
            (
                f"no search epoch was within search.tolerance of the gates-open pretrained model on "
                f"validation (logloss {ref.get('val_logloss', float('nan')):.4f}, AUC "
                f"{ref.get('val_auc', float('nan')):.4f}): the search keeps every dim (gates open)"
            ),
        )
    for w in metrics["warnings"]:
        log.warning("search: %s", w)


def sparsest_rule(cfg: DictConfig, out: Path, h0: float | None):
    """The :class:`~ihas_lightning.modules.selection.SparsestSelection` callback of
    ``method.select=sparsest`` (None for any other rule)."""
    if not (method.has_selector(cfg) and cfg.method.select == "sparsest") or method.transferring(cfg):
        return None
    from ..modules.selection import SparsestSelection

    tol = cfg.search.tolerance
    return SparsestSelection(
        out,
        float(tol.ne),
        float(tol.auc),
        float(h0 or 1.0),
        confidence=float(tol.confidence),
        stop_when=str(cfg.search.stop_when),
    )


def _select_gates_open(trainer, module, rule, out: Path) -> None:
    """The fallback of ``select=sparsest``: the pretrained weights with every gate open, as best.ckpt."""
    state = torch.load(rule.pretrained_path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    module.model.selector.open_all()
    module.eval_mode = "deterministic"
    path = out / BEST
    trainer.save_checkpoint(path)
    rule.best_model_path = str(path)
    log.warning("search: no search epoch within search.tolerance of the gates-open model: gates open")


# ---- Base from the search's pretraining (stage=all) -------------------------------------------------------
def pretraining_is_base(cfg: DictConfig, cb: DictConfig) -> bool:
    """The search of ``cfg`` pretrains exactly Base's fit (``cb``, :func:`~ihas_lightning.pipeline.base_config`):
    the same model and optimizers, every train row, the same epoch budget, patience, monitor and best-epoch
    restore. The module's init and the batches are Base's by construction (tested to the last bit), so the
    restored pretrained weights are Base's best checkpoint and Base need not be fitted a second time."""
    if not _is_sparsest(cfg) or world_size() > 1:
        return False
    pre = method.pretrain(cfg)
    base_patience = method.setting(cb, "patience") if bool(cb.method.early_stop) else None
    return (
        bool(pre.get("restore_best", True))
        and int(pre.max_epochs) == int(method.setting(cb, "max_epochs"))
        and pre.get("patience") == base_patience
        and method.model_cfg(cfg) == method.model_cfg(cb)
        and not method.has_selector(cb)
    )


def base_from_pretraining(cb: DictConfig, search_out: Path) -> dict[str, Any] | None:
    """Base's ``search/`` outputs from the search in ``search_out`` whose pretraining was Base's fit
    (:func:`pretraining_is_base`): ``best.ckpt`` holds the restored pretrained weights without the gate,
    scored on val and test as a fitted Base is; the epochs, steps and training time are the pretraining's
    (``pretraining.json``). None when the search left no such record (Base is then fitted)."""
    from ..loggers import build_logger, finish_loggers
    from ..modules.selection import PRETRAINED
    from ..training import build_trainer
    from ..utils import read_json

    rec_path, src = search_out / PRETRAINING, search_out / PRETRAINED
    if not (rec_path.is_file() and src.is_file()):
        return None
    rec = read_json(rec_path)
    if rec.get("best_epoch") is None or not rec.get("restored", True):
        return None
    check_cfg(cb)
    plan = _start(cb)
    seed_everything(int(cb.seed))
    _load_data(cb, plan)
    module, bias, h0, _ = _build(cb, plan)
    best = plan.out / BEST
    _write_base_ckpt(module, torch.load(src, map_location="cpu", weights_only=True), rec, best)
    logger = build_logger(cb, str(cb.get("tag") or "search"))
    try:
        trainer = build_trainer(cb, int(method.setting(cb, "max_epochs")), [], logger, plan.out_root)
        val = trainer.validate(
            module, dataloaders=plan.dm.val_dataloader(), ckpt_path=str(best), verbose=False
        )
        test = trainer.test(module, dataloaders=plan.dm.test_dataloader(), ckpt_path=str(best), verbose=False)
        plan.budget["patience"] = _patience(cb, plan)
        timing = SimpleNamespace(
            seconds=rec.get("train_seconds") or 0.0, samples=rec.get("train_samples") or 0
        )
        fit = {
            "fit_seconds": rec.get("fit_seconds") or 0.0,
            "max_epochs": int(method.setting(cb, "max_epochs")),
        }
        metrics = _metrics(cb, plan, trainer, module, best, val, test, timing, fit)
        metrics.update(epochs_run=int(rec["epochs"]), global_step=int(rec["global_step"]))
        metrics["budget"].update(train_positive_rate=plan.prior, output_bias=bias)
        metrics["derived_from"] = {
            "search": str(Path("..") / ".." / SEARCH_DIR),
            "note": "Base is the search's pretraining (same init, batches and stopping rule): its restored "
            "weights, not a second fit; the epochs and the training time are the pretraining's"
            + (" (a resumed pretraining: its time is partial)" if rec.get("resumed") else ""),
        }
        write_json(plan.out / "metrics.json", metrics)
        _write_manifest(cb, plan.out, plan.prepared, plan.fmap, best)
        log.info("base: from the search's pretraining (epoch %s), val/auc=%s test/auc=%s",
                 metrics["best_epoch"], _round(metrics["val/auc"]), _round(metrics["test/auc"]))  # fmt: skip
        return metrics
    finally:
        finish_loggers()


def _write_base_ckpt(module, pretrained: dict[str, Any], rec: dict[str, Any], path: Path) -> None:
    """Base's best.ckpt: the pretrained checkpoint's weights less the gate's, at the best epoch's counters."""
    own = module.state_dict()
    state = pretrained["state_dict"]
    missing = sorted(set(own) - set(state))
    extra = sorted(k for k in set(state) - set(own) if not k.startswith("model.selector."))
    if missing or extra:
        raise RuntimeError(
            f"the pretrained checkpoint is not Base's model: missing {missing}, unexpected {extra}"
        )
    ckpt = {k: pretrained[k] for k in ("pytorch-lightning_version",) if k in pretrained}
    ckpt.update(
        epoch=int(rec["best_epoch"]),
        global_step=int(rec.get("best_global_step") or 0),
        state_dict={k: state[k] for k in own},
        hparams_name="kwargs",
        hyper_parameters=dict(module.hparams),
        search_phase={
            "search_start_epoch": 0,
            "lr_scaled": False,
            "gate_steps": 0,
            "search_batches_drawn": 0,
        },
    )
    tmp = path.with_suffix(".ckpt.tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def _write_manifest(cfg: DictConfig, out: Path, prepared: Path, fmap, best: Path) -> None:
    from ..artifacts import make_manifest, write_manifest

    # a resumed search is the same search: its manifest must not depend on where it resumed from
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(cfg):
        cfg.search.resume = None
    manifest = make_manifest(
        "search",
        cfg,
        MANIFEST_KEYS,
        parents=manifest_parents(cfg, prepared),
        extra={
            "resolved_config_hash": stable_hash(OmegaConf.to_container(cfg, resolve=True)),
            "prepared_dir": str(prepared.resolve()),
            "feature_map_hash": fmap.config_hash,
            "method": str(cfg.method.name),
            "best_ckpt": str(best.resolve()),
            "files": sorted(p.name for p in out.iterdir() if p.is_file()),
        },
    )
    write_manifest(out, manifest)
