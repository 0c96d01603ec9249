"""Retraining stage of iHAS (paper section 3.5.3 "Retraining Stage").

For each cluster of the clustering stage (``cluster.dir``, default this run's ``cluster/``) a
genuinely smaller DLRM is built from the cluster's majority-rule dims -- ``DLRM(vocab_sizes,
field_dims=dims_c)``, a size-0 field removed, the MLP ``model.hidden`` (16, 8) on the resulting
width -- and trained with a Lightning Trainer on the cluster's TRAIN samples only
(``IHASDataModule(row_filter=...)`` over the cluster assignments), with early stopping and best
checkpoint selection on the cluster's VAL samples (``retrain.monitor``, default ``val/logloss``), for
up to ``retrain.max_epochs`` epochs with ``retrain.patience`` (the batch size follows the cluster's size
with ``model.batch_size=auto``, and the output bias starts at the cluster's own log-odds, so a small
cluster still gets enough steps and starts calibrated). Logloss rather than AUC: the routed predictions of all clusters are pooled
into one test AUC, so each cluster model must be calibrated, not only rank well within its cluster
(selecting by AUC kept an uncalibrated epoch-1 model on one seed and the pooled AUC fell below Base).
``retrain.init=searched`` (default, the paper) copies the kept dims of each field from the searched
embedding tables; ``scratch`` starts from a fresh init.

The guard (``retrain.guard``, null = ``method.retrain_guard``: ``base`` for iHAS and its ablations, ``none``
for the baselines): after cluster c's fit, the retrained model and Base (:func:`~ihas_lightning.rundir.base_checkpoint`)
score the cluster's validation rows; unless the retrained model is within ``search.tolerance`` of Base
(:func:`~ihas_lightning.modules.selection.guard_verdict`: excess logloss <= ``search.tolerance.ne`` x the
constant logloss at the cluster's train base rate, AUC >= Base's - ``search.tolerance.auc``; on the means,
or at ``retrain.guard_confidence`` > 0 the paired one-sided bounds), the cluster's ``best.ckpt`` becomes Base's model at full dims
(:meth:`RetrainModule.from_base`, ``"fallback": "base"`` in its metrics.json); no Base in the run dir:
skipped, with a warning (recorded in metrics.json / retrain.json).

Outputs: ``retrain/cluster_<k>/{best.ckpt, metrics.json, manifest.json}`` (each written atomically)
and ``retrain/{retrain.json, manifest.json}``.

Resume: re-running into the same output dir skips every cluster whose ``best.ckpt`` +
``metrics.json`` exist and whose manifest has the same config hash and the same parent artifacts
(cluster dir, search checkpoint); anything else (a changed config, a new clustering, a half-written
dir) is retrained.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from .. import method
from ..artifacts import is_current, make_manifest, same_origin, write_manifest
from ..data.feature_map import FeatureMap
from ..distributed import barrier, broadcast_object, is_global_zero
from ..errors import ConfigError, DataError
from ..loggers import PrefixedLogger, build_logger, finish_loggers
from ..modules.retrain import INITS, RetrainModule
from ..rundir import (  # noqa: F401 - check_cluster_fits, data_dir_for, load_cluster_models re-exported
    BEST,
    RETRAIN_DIR,
    STARTED,
    base_checkpoint,
    check_cluster_fits,
    data_dir_for,
    load_arch_dir,
    load_cluster_models,
    load_search_model,
    make_datamodule,
    output_dir,
    resolve_arch_dir,
    resolve_search_ckpt,
)
from ..training import build_trainer, fit_ctr, val_rows  # noqa: F401 - fit_ctr re-exported
from ..utils import atomic_dir, read_json, seed_everything, write_json

log = logging.getLogger("ihas_lightning")

CONFIG_KEYS = [
    "seed",
    "retrain.max_epochs",
    "retrain.patience",
    "retrain.patience_steps",
    "retrain.min_class_rows",
    "search.tolerance",
    "retrain.init",
    "retrain.guard",
    "retrain.guard_confidence",
    "method.name",
    "method.retrain_init",
    "method.retrain_guard",
    "method.rewind_tag",
    "method.embedding_optimizer",
    "retrain.monitor",
    "model",
    "trainer.fast_dev_run",
    "trainer.limit_train_batches",
    "trainer.limit_val_batches",
]


# ---- the stage ---------------------------------------------------------------------------------------
def check_cfg(cfg: DictConfig) -> None:
    """Every key the retrain stage will use, checked before any work."""
    from ..schedule import check_batch_size
    from ..training import check_fit_cfg

    check_fit_cfg(cfg.retrain, "retrain")
    mc = cfg.retrain.get("min_class_rows")
    if not isinstance(mc, int) or isinstance(mc, bool) or mc < 0:
        raise ConfigError(f"config key 'retrain.min_class_rows': must be an integer >= 0 (got {mc!r})")
    ps = cfg.retrain.get("patience_steps")
    if ps is not None and (not isinstance(ps, int) or isinstance(ps, bool) or ps < 0):
        raise ConfigError(
            f"config key 'retrain.patience_steps': must be an integer >= 0 or null (got {ps!r})"
        )
    init = cfg.retrain.get("init")
    if init is not None and str(init) not in INITS:
        raise ConfigError(
            f"config key 'retrain.init': must be one of {list(INITS)} or null (the method's) (got '{init}')"
        )
    guard = cfg.retrain.get("guard")
    if guard is not None and (not isinstance(guard, str) or guard not in method.RETRAIN_GUARDS):
        raise ConfigError(
            f"config key 'retrain.guard': must be one of {list(method.RETRAIN_GUARDS)} or null (the method's) "
            f"(got {guard!r})"
        )
    gc = cfg.retrain.get("guard_confidence")
    if isinstance(gc, bool) or not isinstance(gc, (int, float)) or not 0.0 <= float(gc) < 1.0:
        raise ConfigError(f"config key 'retrain.guard_confidence': must be a number in [0, 1) (got {gc!r})")
    method.check(cfg)
    check_batch_size(cfg.model)


def run(cfg: DictConfig, logger: Any = None) -> dict[str, Any]:
    """stage=retrain. ``logger``: a Lightning logger of the calling pipeline (else one is built)."""
    check_cfg(cfg)
    init = method.retrain_init(cfg)
    cluster_dir, parent_key = resolve_arch_dir(cfg)
    info = load_arch_dir(cluster_dir)
    prepared = data_dir_for(cfg, info)
    fmap = FeatureMap.load(prepared)
    check_cluster_fits(cluster_dir, info, fmap)
    parents: dict[str, Any] = {parent_key: cluster_dir}
    searched = _start_weights(cfg, init, cluster_dir, info, fmap, parents)
    guard = _guard_base(cfg, fmap, cluster_dir)
    if guard is not None and guard["ckpt"] is not None:
        parents["base_ckpt"] = guard["ckpt"]  # a new Base retrains (resume manifests)
    out = output_dir(cfg) / RETRAIN_DIR
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = method.model_cfg(cfg)
    k = int(info["k"])

    own = logger is None
    if own:
        logger = build_logger(cfg, f"{cfg.tag}")
    results: list[dict[str, Any]] = []
    try:
        for c in range(k):
            cdir = out / f"cluster_{c}"
            manifest = make_manifest("retrain", cfg, CONFIG_KEYS, parents=parents, extra={"cluster": c})
            if is_current(cdir, manifest, [BEST, "metrics.json"]):
                log.info("retrain stage: cluster %d is up to date in %s; skipping (resume)", c, cdir)
                m = read_json(cdir / "metrics.json")
                m["resumed"] = True
                results.append(m)
                continue
            results.append(
                _train_cluster(
                    cfg, c, info, prepared, fmap, model_cfg, searched, init, cdir, manifest, logger, guard
                )
            )
        results, pooled = _pooled_guard(cfg, guard, info, prepared, fmap, out, results, parents)
        summary = {
            "k": k,
            "init": init,
            "guard": {**_guard_summary(guard, results), "pooled": pooled},
            "cluster_dir": str(cluster_dir.resolve()),
            "arch_source": parent_key,
            "prepared_dir": str(prepared.resolve()),
            "clusters": results,
        }
        if is_global_zero():
            write_json(out / "retrain.json", summary)
            write_manifest(out, make_manifest("retrain", cfg, CONFIG_KEYS, parents=parents))
        barrier()
        metrics: dict[str, Any] = {}
        for r in results:
            c = r["cluster"]
            for key in ("val_auc", "test_auc", "test_logloss", "params"):
                if r.get(key) is not None:
                    metrics[f"retrain/cluster_{c}/{key}"] = r[key]
            if guard is not None and guard["base"] is not None:
                metrics[f"retrain/cluster_{c}/fallback"] = float(r.get("fallback") == "base")
        if logger is not None:
            logger.log_metrics({k_: float(v) for k_, v in metrics.items()})
    finally:
        if own:
            finish_loggers()
    return metrics


def _start_weights(cfg: DictConfig, init: str, cluster_dir: Path, info, fmap: FeatureMap, parents) -> Any:
    """What ``retrain.init`` starts the cluster models from (the searched model, a snapshot's state dict,
    the searched state dict; None for scratch); its files are added to ``parents``."""
    if init not in ("searched", "rewind", "continue"):
        return None
    ckpt = resolve_search_ckpt(cfg, cluster_dir)
    parents["search_ckpt"] = ckpt
    if init == "searched":
        searched = load_search_model(ckpt, fmap).model
        if searched.embed_dim != int(info["embed_dim"]) or not searched.embedding.uniform:
            raise DataError(
                f"{ckpt}: embed dim {searched.embed_dim} != the architecture's {info['embed_dim']}"
            )
        return searched
    if init == "rewind":
        tag = str(cfg.method.get("rewind_tag"))
        snap = ckpt.parent / "snapshots" / f"{tag}.pt"
        if not snap.is_file():
            raise DataError(
                f"{snap}: no snapshot {tag!r} to rewind to (method.rewind_tag; re-run stage=search)"
            )
        parents["snapshot"] = snap
        return torch.load(snap, map_location="cpu", weights_only=True)
    return load_search_model(ckpt, fmap).model.state_dict()  # continue


def _too_few_to_judge(dm: Any, n: dict[str, int], need: int) -> str | None:
    """Why the cluster's validation rows cannot show a trained model beats its start (None: they can):
    fewer than ``need`` positives or negatives."""
    rate = dm.positive_rate("val") if n["val"] else None
    if rate is None:
        return None
    pos = int(round(rate * n["val"]))
    if min(pos, n["val"] - pos) < need:
        return f"{pos} positives / {n['val'] - pos} negatives in its validation rows (< retrain.min_class_rows={need})"
    return None


def _train_cluster(
    cfg: DictConfig,
    c: int,
    info: dict[str, Any],
    prepared: Path,
    fmap: FeatureMap,
    model_cfg: Any,
    searched: Any,
    init: str,
    cdir: Path,
    manifest: dict[str, Any],
    logger: Any,
    guard: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build, start and fit cluster ``c``'s model on its rows (then the guard, ``guard`` not None);
    writes ``cdir`` (atomically)."""
    from .. import schedule

    dims = [int(d) for d in info["field_dims"][c]]
    masks, n = _cluster_rows(info, fmap, c)
    bs = schedule.batch_size(cfg.model, n["train"])
    dm = make_datamodule(cfg, prepared, batch_size=bs, row_filter=masks)
    rate = dm.positive_rate("train")
    module = _cluster_module(cfg, c, info, fmap, model_cfg, searched, init, dims, rate)
    log.info(
        "retrain stage: cluster %d: %d train / %d val / %d test samples (positive rate %.3f), field dims %s "
        "(MLP in %d, %d params), batch %d, init %s",
        c, n["train"], n["val"], n["test"], rate or 0.0, dims, sum(dims), module.model.num_parameters(), bs, init,
    )  # fmt: skip
    monitor = n["val"] > 0
    epochs = int(cfg.retrain.max_epochs)
    few = _too_few_to_judge(dm, n, int(cfg.retrain.min_class_rows))
    if few and init in ("continue", "searched", "rewind") and monitor:
        # too few positives (or negatives) among the cluster's validation rows to tell whether training
        # helped: a 0.05%-CTR cluster was trained to predict 0 for every row and wrecked the pooled AUC
        log.warning("retrain stage: cluster %d: %s; it keeps its start (no training)", c, few)
        epochs = 0
    if not monitor:
        log.warning(
            "retrain stage: cluster %d has no val samples: no early stopping, the last epoch is kept", c
        )
    sub = PrefixedLogger(logger, f"retrain/cluster_{c}") if logger is not None else None
    # the fit's checkpoints live in cluster_<c>.partial/ until it finishes: a killed retrain continues
    # this cluster from its last epoch (same config and parents: started.json), not from scratch
    partial = cdir.with_name(cdir.name + ".partial")
    resume = _resume_or_start(partial, manifest, c)
    meta = {"cluster": c, "field_dims": dims, "embedding_width": sum(dims), "samples": n, "batch_size": bs,
            "train_positive_rate": rate, "init": init}  # fmt: skip
    kept_start = few if epochs == 0 else None
    return _fit_cluster(
        cfg, module, dm, cdir, partial, resume, epochs, monitor, sub, manifest, meta, kept_start, guard
    )


def _fit_cluster(cfg, module, dm, cdir: Path, partial: Path, resume, epochs: int, monitor: bool, sub, manifest,
                 meta: dict[str, Any], kept_start, guard=None) -> dict[str, Any]:  # fmt: skip
    """Fit the cluster model in ``cdir`` (atomically; checkpoints in ``partial``), apply the guard and
    write its metrics."""
    from .. import schedule

    n, bs = meta["samples"], meta["batch_size"]
    with atomic_dir(cdir, overwrite=True) as tmp:
        res = fit_ctr(
            module,
            dm,
            cfg,
            tmp,
            max_epochs=epochs,
            patience=schedule.patience_epochs(
                cfg.retrain.get("patience"),
                schedule.batches_per_epoch(n["train"], bs),
                cfg.retrain.get("patience_steps"),
            ),
            logger=sub,
            monitor_val=monitor,
            monitor=str(cfg.retrain.monitor),
            ckpt_dir=partial if monitor else None,
            resume=resume,
            # the cluster model's start (e.g. the searched model narrowed to the cluster's dims) is a
            # candidate: the retrained model is never worse on the cluster's validation rows than it
            # (a resumed fit too: the module is rebuilt from the same seed, so its start is the same)
            keep_init=True,
            # ... and it must beat that start with confidence (the search's burden of proof)
            init_confidence=float(cfg.search.tolerance.confidence),
        )
        res["resumed_from_epoch"] = (
            int(torch.load(resume, map_location="cpu", weights_only=True).get("epoch", -1))
            if resume
            else None
        )
        res["best_ckpt"] = str((cdir / BEST).resolve())
        if epochs == 0:
            res["best_epoch"] = -1  # the start
        counts = module.model.parameter_counts()
        metrics = {**meta, "parameter_counts": counts, **res, "resumed": False, "kept_start": kept_start}
        if guard is not None:
            metrics = _apply_guard(cfg, guard, dm, tmp, metrics, module.field_names)
        if is_global_zero():
            write_json(tmp / "metrics.json", metrics)
            write_manifest(tmp, manifest)
    if is_global_zero():
        shutil.rmtree(partial, ignore_errors=True)
    barrier()
    return metrics


# ---- the guard: no cluster model worse than Base on its cluster's validation rows ---------------------
#: the guard's NE unit (recorded): each cluster's logloss is on the scale of its own base rate
GUARD_H0 = "constant logloss at the cluster's train base rate"


def _guard_base(cfg: DictConfig, fmap: FeatureMap, cluster_dir: Path) -> dict[str, Any] | None:
    """The guard's Base (``method.retrain_guard`` / ``retrain.guard`` = base): {ckpt, base (its DLRM),
    model_cfg, skipped, source}; the run's Base, else the search's gates-open pretrained model (its
    ``pretrained.ckpt``: Base's budget, stopping rule and seed, so Base itself: a sweep's iHAS job has no
    Base of its own); ``base`` None (and ``skipped`` why, warned) when there is neither; None when the
    guard is off."""
    if method.retrain_guard(cfg) != "base":
        return None
    ckpt = base_checkpoint(cfg)
    if ckpt is None:
        pre = _pretrained_base(cfg, fmap, cluster_dir)
        if pre is not None:
            return pre
    if ckpt is None:
        why = (f"no Base model to guard with (evaluate.base_ckpt, default {output_dir(cfg) / 'base/search' / BEST}; "
               "stage=all trains it)")  # fmt: skip
        log.warning(
            "retrain stage: retrain.guard=base skipped: %s; the cluster models are kept as trained", why
        )
        return {"ckpt": None, "base": None, "model_cfg": None, "skipped": why, "source": None}
    module = load_search_model(ckpt, fmap)
    if module.model.selector is not None:
        raise DataError(f"{ckpt}: not a Base checkpoint (its model has a selector; evaluate.base_ckpt)")
    return {"ckpt": ckpt, "base": module.model, "model_cfg": dict(module.hparams["model"]), "skipped": None,
            "source": "base"}  # fmt: skip


def _pretrained_base(cfg: DictConfig, fmap: FeatureMap, cluster_dir: Path) -> dict[str, Any] | None:
    """The search's gates-open pretrained model as a plain model (its gate removed: with every gate
    open the searched model is the embedding + backbone alone), or None without a ``pretrained.ckpt``."""
    import copy

    from ..modules.selection import PRETRAINED

    try:
        pre = resolve_search_ckpt(cfg, cluster_dir).parent / PRETRAINED
    except DataError:
        return None
    if not pre.is_file():
        return None
    module = load_search_model(pre, fmap)
    searched_with = dict(module.hparams["model"]).get("backbone")
    if method.skips_search(cfg) or searched_with != method.model_cfg(cfg).get("backbone"):
        return None  # a transferred search (another backbone's): its pretrained model is not this Base
    model = copy.deepcopy(module.model)
    model.selector = None  # gates open: e * 1 = e, the same logits without the gate
    log.info("retrain stage: the guard's Base is the search's gates-open pretrained model (%s)", pre)
    return {"ckpt": pre, "base": model.eval(), "model_cfg": dict(module.hparams["model"]), "skipped": None,
            "source": "search pretrained (gates open)"}  # fmt: skip


def _apply_guard(cfg: DictConfig, guard: dict[str, Any], dm, tmp: Path, metrics: dict[str, Any],
                 field_names) -> dict[str, Any]:  # fmt: skip
    """Cluster ``metrics["cluster"]``'s verdict against Base on its validation rows; where the retrained
    model (``tmp/best.ckpt``) is not admissible, Base's model at full dims replaces it there and the
    metrics become Base's on the cluster's rows (the retrained model's under ``retrained``)."""
    from .. import schedule
    from ..modules.selection import guard_verdict

    c = metrics["cluster"]
    if guard["base"] is None:
        return {**metrics, "guard": {"mode": "base", "skipped": guard["skipped"]}, "fallback": None}
    try:
        base = RetrainModule.from_base(
            guard["base"], guard["model_cfg"], cluster_id=c, field_names=field_names
        )
    except ValueError as e:
        raise DataError(f"{guard['ckpt']}: {e}") from None
    has_val = metrics["samples"]["val"] > 0
    # trainer=ddp: every rank reads rank 0's file (another rank's atomic dir is an empty scratch dir)
    best = broadcast_object(str(tmp / BEST))
    trained = RetrainModule.load_from_checkpoint(best, map_location="cpu", weights_only=True)
    barrier()  # every rank has read it before rank 0 may replace it with Base's
    rows = val_rows(trained, dm, cfg, tmp)[0] if has_val else None
    base_rows = val_rows(base, dm, cfg, tmp)[0] if has_val else None
    tol = cfg.search.tolerance
    h0 = schedule.base_rate_entropy(metrics["train_positive_rate"]) or 0.0
    conf = float(cfg.retrain.guard_confidence)
    v = guard_verdict(rows, base_rows, float(tol.ne), float(tol.auc), h0, conf)
    v.update(mode="base", base_ckpt=str(Path(guard["ckpt"]).resolve()), constant_logloss_of=GUARD_H0)
    if v["admissible"]:
        return {**metrics, "guard": v, "fallback": None}
    m, b = v["model"], v["base"]
    log.warning(
        "retrain stage: cluster %d falls back to Base (%s): val AUC %s vs Base %s, logloss %s vs %s; "
        "excess logloss %s (tolerance %.2e), AUC difference %s (tolerance -%g)",
        c, v["reason"], _f4(m["val_auc"]), _f4(b["val_auc"]), _f4(m["val_logloss"]), _f4(b["val_logloss"]),
        _f4(v["excess_upper"], "+.2e"), v["tolerance"]["logloss"], _f4(v["auc_lower"], "+.4f"), tol.auc,
    )  # fmt: skip
    return _serve_base(cfg, base, dm, tmp, metrics, v)


def _serve_base(
    cfg: DictConfig, base, dm, tmp: Path, metrics: dict[str, Any], v: dict[str, Any]
) -> dict[str, Any]:
    """Base's model (``base``, full dims) saved as the cluster's ``tmp/best.ckpt``; the metrics become
    Base's on the cluster's rows (``v["base"]``: its validation metrics there; the retrained model's
    under ``retrained``)."""
    b = v["base"]
    trainer = build_trainer(cfg, 1, [], None, tmp, enable_checkpointing=False, inference_mode=False)
    test = (trainer.test(base, datamodule=dm, verbose=False) or [{}])[0]
    trainer.save_checkpoint(str(tmp / BEST))  # the cluster's model is Base's (same class of checkpoint)
    keys = ("val_auc", "val_logloss", "test_auc", "test_logloss", "params", "parameter_counts", "best_epoch",
            "field_dims", "embedding_width")  # fmt: skip
    served = {"val_auc": b["val_auc"], "val_logloss": b["val_logloss"], "params": base.model.num_parameters(),
              "test_auc": _num(test.get("test/auc")), "test_logloss": _num(test.get("test/logloss")),
              "parameter_counts": base.model.parameter_counts(), "best_epoch": None,
              "field_dims": list(base.model.field_dims), "embedding_width": sum(base.model.field_dims)}  # fmt: skip
    return {
        **metrics,
        **served,
        "retrained": {k: metrics.get(k) for k in keys},
        "guard": v,
        "fallback": "base",
    }


def _pooled_guard(
    cfg: DictConfig, guard, info, prepared: Path, fmap: FeatureMap, out: Path, results, parents
):
    """The routed model as a whole against Base on every validation row (each row scored by its
    cluster's model, the cross-cluster calibration included), by the same rule as each cluster's; where
    it fails, every cluster still on its retrained model serves Base's too. Returns (results, verdict or
    None where nothing was judged)."""
    from ..distributed import world_size
    from ..modules.selection import guard_verdict

    kept = [c for c, r in enumerate(results) if r.get("fallback") != "base"]
    if (
        guard is None
        or guard["base"] is None
        or len(results) < 2
        or info.get("assign_val") is None
        or not kept
    ):
        return results, None
    if world_size() > 1:  # the gathered rows are in rank order, not the file's: no per-row routing
        return results, {"skipped": "trainer=ddp"}
    assign = torch.as_tensor(np.asarray(info["assign_val"]), dtype=torch.long)
    dm = make_datamodule(cfg, prepared, batch_size=max(int(r["batch_size"]) for r in results))
    where = out / ".pooled"
    base = RetrainModule.from_base(guard["base"], guard["model_cfg"], field_names=fmap.field_names)
    base_rows = val_rows(base, dm, cfg, where)[0]
    if base_rows is None or len(base_rows) != len(assign):
        shutil.rmtree(where, ignore_errors=True)
        return results, None
    served = base_rows.clone()
    for c in kept:
        mod = RetrainModule.load_from_checkpoint(str(out / f"cluster_{c}" / BEST), map_location="cpu",
                                                 weights_only=True)  # fmt: skip
        rows = val_rows(mod, dm, cfg, where)[0]
        if rows is None or not torch.equal(rows[:, 2], base_rows[:, 2]):  # not the same rows in order
            shutil.rmtree(where, ignore_errors=True)
            return results, {"skipped": "the validation rows did not line up"}
        served[assign == c] = rows[assign == c]
    shutil.rmtree(where, ignore_errors=True)
    tol, h0 = cfg.search.tolerance, _h0(dm.positive_rate("train"))
    v = guard_verdict(
        served, base_rows, float(tol.ne), float(tol.auc), h0, float(cfg.retrain.guard_confidence)
    )
    v.update(mode="pooled", constant_logloss_of="constant logloss at the run's train base rate")
    if not v["admissible"]:
        v["reason"] = "the routed model is not within search.tolerance of Base on the validation rows"
    if v["admissible"]:
        return results, v
    log.warning(
        "retrain stage: the routed model as a whole is not within search.tolerance of Base on the validation "
        "rows (AUC %s vs Base %s, logloss %s vs %s): clusters %s serve Base's model too",
        _f4(v["model"]["val_auc"]), _f4(v["base"]["val_auc"]), _f4(v["model"]["val_logloss"]),
        _f4(v["base"]["val_logloss"]), kept,
    )  # fmt: skip
    for c in kept:
        manifest = make_manifest("retrain", cfg, CONFIG_KEYS, parents=parents, extra={"cluster": c})
        results[c] = _pooled_fallback(
            cfg, guard, info, prepared, fmap, out / f"cluster_{c}", results[c], v, manifest
        )
    return results, v


def _h0(rate: float | None) -> float:
    from .. import schedule

    return schedule.base_rate_entropy(rate) or 0.0


def _pooled_fallback(
    cfg, guard, info, prepared: Path, fmap: FeatureMap, cdir: Path, metrics, pooled, manifest
):
    """Cluster ``metrics["cluster"]``'s dir rewritten (atomically) with Base's model, after the pooled
    verdict ``pooled`` failed; its own verdict is kept under ``guard``."""
    from ..modules.selection import row_metrics

    c = int(metrics["cluster"])
    masks, _ = _cluster_rows(info, fmap, c)
    dm = make_datamodule(cfg, prepared, batch_size=int(metrics["batch_size"]), row_filter=masks)
    base = RetrainModule.from_base(
        guard["base"], guard["model_cfg"], cluster_id=c, field_names=fmap.field_names
    )
    with atomic_dir(cdir, overwrite=True) as tmp:
        b = row_metrics(val_rows(base, dm, cfg, tmp)[0])
        new = _serve_base(cfg, base, dm, tmp, metrics, {**(metrics.get("guard") or {}), "base": b})
        new.update(fallback_reason="pooled", pooled_guard={k: pooled[k] for k in ("model", "base", "reason")})
        if is_global_zero():
            write_json(tmp / "metrics.json", new)
            write_manifest(tmp, manifest)
    return new


def _guard_summary(guard: dict[str, Any] | None, results: list[dict[str, Any]]) -> dict[str, Any]:
    """retrain.json's guard entry: the mode, its Base, why it was skipped, the clusters that fell back."""
    if guard is None:
        return {"mode": "none"}
    fell = [r["cluster"] for r in results if r.get("fallback") == "base"]
    return {"mode": "base", "base_ckpt": str(Path(guard["ckpt"]).resolve()) if guard["ckpt"] else None,
            "base_source": guard.get("source"), "skipped": guard["skipped"], "constant_logloss_of": GUARD_H0, "fallback_clusters": fell,
            "fallbacks": len(fell)}  # fmt: skip


def _f4(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def _num(v: Any) -> float | None:
    return None if v is None else float(v)


def _cluster_rows(info: dict[str, Any], fmap: FeatureMap, c: int):
    """Cluster ``c``'s row masks per split (None: every row, the derive stage's one architecture) and
    their counts; a cluster without train rows is an error."""
    if info.get("assign_train") is None:  # one architecture for every row (derive stage)
        masks = None
        n = {s: fmap.rows(s) for s in ("train", "val", "test")}
    else:
        masks = {s: np.asarray(info[f"assign_{s}"]) == c for s in ("train", "val", "test")}
        n = {s: int(m.sum()) for s, m in masks.items()}
    if n["train"] == 0:
        raise DataError(f"cluster {c} has no train samples (re-run stage=cluster with a smaller cluster.k)")
    return masks, n


def _cluster_module(cfg, c: int, info, fmap: FeatureMap, model_cfg, searched, init: str, dims, rate):
    """Cluster ``c``'s RetrainModule (its kept dims, kept embedding rows, PEP's entry mask), started as
    ``retrain.init`` says (searched embeddings, a snapshot, or the searched model narrowed)."""
    from .. import schedule

    row_keep = info.get("row_keep")
    row_counts = None
    bounds = np.cumsum([0, *fmap.vocab_sizes])
    if row_keep is not None:
        row_counts = [
            int(row_keep[bounds[f] : bounds[f + 1]].sum()) if dims[f] else 0 for f in range(len(dims))
        ]
    bias = schedule.prior_logit(rate) if cfg.model.output_bias == "prior" else None
    seed_everything(int(cfg.seed) + c)
    module = RetrainModule(
        fmap.vocab_sizes,
        model_cfg,
        field_dims=dims,
        kept_dims=info["kept_dims"][c],
        cluster_id=c,
        field_names=fmap.field_names,
        output_bias=bias,
        row_counts=row_counts,
        entry_masked=info.get("entry_mask") is not None,
    )
    if row_keep is not None:
        keep = row_keep.clone()
        for f in range(len(dims)):  # a dropped field keeps no rows
            if not dims[f]:
                keep[int(bounds[f]) : int(bounds[f + 1])] = False
        module.set_row_keep(keep)
    if init == "searched":
        module.init_from_searched(searched)
    elif init in ("rewind", "continue"):
        try:
            module.init_from_snapshot(searched)
        except ValueError as e:
            raise DataError(f"retrain.init={init}: {e}") from None
    if info.get("entry_mask") is not None:  # PEP: V <- V_init * M, the mask fixed for the whole retrain
        module.set_entry_mask(info["entry_mask"])
    return module


def _resume_or_start(partial: Path, manifest: dict[str, Any], c: int) -> Path | None:
    """A killed fit of the same config and parents (``partial/started.json``) resumes from its last
    checkpoint; else ``partial`` starts empty. Collective under trainer=ddp (rank 0 changes the files)."""
    resume = None
    barrier()  # trainer=ddp: every rank decides on the same files; rank 0 alone changes them
    if (partial / "last.ckpt").is_file() and (partial / STARTED).is_file():
        if same_origin(read_json(partial / STARTED), manifest):
            resume = partial / "last.ckpt"
            log.info("retrain stage: cluster %d: resuming a killed fit from %s", c, resume)
    barrier()
    if resume is None and is_global_zero():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        write_json(
            partial / STARTED, {k: manifest[k] for k in ("stage", "config_hash", "parents", "created")}
        )
    barrier()
    return resume
