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
from ..distributed import barrier, is_global_zero
from ..errors import ConfigError, DataError
from ..loggers import PrefixedLogger, build_logger, finish_loggers
from ..modules.retrain import INITS, RetrainModule
from ..rundir import (  # noqa: F401 - check_cluster_fits, data_dir_for, load_cluster_models re-exported
    BEST,
    RETRAIN_DIR,
    STARTED,
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
from ..training import fit_ctr  # noqa: F401 - re-exported
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
    "method.name",
    "method.retrain_init",
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
    searched = None
    if init in ("searched", "rewind", "continue"):
        ckpt = resolve_search_ckpt(cfg, cluster_dir)
        parents["search_ckpt"] = ckpt
    if init == "searched":
        searched = load_search_model(ckpt, fmap).model
        if searched.embed_dim != int(info["embed_dim"]) or not searched.embedding.uniform:
            raise DataError(
                f"{ckpt}: embed dim {searched.embed_dim} != the architecture's {info['embed_dim']}"
            )
    elif init == "rewind":
        tag = str(cfg.method.get("rewind_tag"))
        snap = ckpt.parent / "snapshots" / f"{tag}.pt"
        if not snap.is_file():
            raise DataError(
                f"{snap}: no snapshot {tag!r} to rewind to (method.rewind_tag; re-run stage=search)"
            )
        parents["snapshot"] = snap
        searched = torch.load(snap, map_location="cpu", weights_only=True)
    elif init == "continue":
        searched = load_search_model(ckpt, fmap).model.state_dict()
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
                    cfg, c, info, prepared, fmap, model_cfg, searched, init, cdir, manifest, logger
                )
            )
        summary = {
            "k": k,
            "init": init,
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
        if logger is not None:
            logger.log_metrics({k_: float(v) for k_, v in metrics.items()})
    finally:
        if own:
            finish_loggers()
    return metrics


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
) -> dict[str, Any]:
    """Build, start and fit cluster ``c``'s model on its rows; writes ``cdir`` (atomically)."""
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
        cfg, module, dm, cdir, partial, resume, epochs, monitor, sub, manifest, meta, kept_start
    )


def _fit_cluster(cfg, module, dm, cdir: Path, partial: Path, resume, epochs: int, monitor: bool, sub, manifest,
                 meta: dict[str, Any], kept_start) -> dict[str, Any]:  # fmt: skip
    """Fit the cluster model in ``cdir`` (atomically; checkpoints in ``partial``) and write its metrics."""
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
        if is_global_zero():
            write_json(tmp / "metrics.json", metrics)
            write_manifest(tmp, manifest)
    if is_global_zero():
        shutil.rmtree(partial, ignore_errors=True)
    barrier()
    return metrics


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
