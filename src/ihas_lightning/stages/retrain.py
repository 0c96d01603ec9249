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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..artifacts import is_current, make_manifest, write_manifest
from ..data.feature_map import FeatureMap, is_complete
from ..errors import ConfigError, DataError
from ..loggers import PrefixedLogger, build_logger, finish_loggers
from ..modules.retrain import INITS, RetrainModule
from ..utils import atomic_dir, read_json, seed_everything, write_json
from .common import (
    BEST,
    RETRAIN_DIR,
    load_search,
    make_datamodule,
    output_dir,
    prepared_dir,
    resolve_cluster_dir,
    resolve_search_ckpt,
)

log = logging.getLogger("ihas_lightning")

CONFIG_KEYS = [
    "seed",
    "retrain.max_epochs",
    "retrain.patience",
    "retrain.init",
    "retrain.monitor",
    "model",
    "trainer.fast_dev_run",
    "trainer.limit_train_batches",
    "trainer.limit_val_batches",
]


# ---- fit one CTR model to convergence (shared mechanics: ihas_lightning.training) -------------------
def fit_ctr(
    module: Any,
    dm: Any,
    cfg: DictConfig,
    out: Path,
    max_epochs: int,
    patience: int | None,
    logger: Any = None,
    monitor_val: bool = True,
    monitor: str = "val/logloss",
) -> dict[str, Any]:
    """Fit ``module`` (a CTRModule) on ``dm`` up to ``max_epochs``, early-stopped on ``monitor``; write
    ``out/best.ckpt`` (best ``monitor``) and return {val auc/logloss and test auc/logloss of the best
    checkpoint, epochs run, seconds, params}."""
    from ..training import build_trainer, selection_callbacks

    callbacks: list[Any] = []
    ckpt_cb = None
    overrides: dict[str, Any] = {"enable_checkpointing": monitor_val}
    if monitor_val:
        callbacks, ckpt_cb = selection_callbacks(out, monitor, patience, save_last=False)
    else:
        overrides["limit_val_batches"] = 0
    trainer = build_trainer(cfg, max_epochs, callbacks, logger, out, **overrides)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - t0
    best = out / BEST
    best_score = None
    if ckpt_cb is not None and ckpt_cb.best_model_path and Path(ckpt_cb.best_model_path).is_file():
        if Path(ckpt_cb.best_model_path).resolve() != best.resolve():
            Path(ckpt_cb.best_model_path).replace(best)
        best_score = float(ckpt_cb.best_model_score) if ckpt_cb.best_model_score is not None else None
        best_epoch = int(torch.load(best, map_location="cpu", weights_only=False).get("epoch", -1))
        module = type(module).load_from_checkpoint(str(best), map_location="cpu")
    else:  # fast_dev_run / no validation: the last weights are the result
        trainer.save_checkpoint(str(best))
        best_epoch = int(trainer.current_epoch)
    val = trainer.validate(module, datamodule=dm, verbose=False) if monitor_val else [{}]
    test = trainer.test(module, datamodule=dm, verbose=False)
    return {
        "best_ckpt": str(best),
        "val_auc": _f(val[0].get("val/auc")) if val else None,
        "val_logloss": _f(val[0].get("val/logloss")) if val else None,
        "best_monitor_during_fit": best_score,
        "test_auc": _f(test[0].get("test/auc")) if test else None,
        "test_logloss": _f(test[0].get("test/logloss")) if test else None,
        "best_epoch": best_epoch,
        "epochs_run": int(trainer.current_epoch),
        "fit_seconds": round(fit_s, 3),
        "params": int(module.model.num_parameters()),
    }


def _f(v: Any) -> float | None:
    return None if v is None else float(v)


# ---- the stage ---------------------------------------------------------------------------------------
def data_dir_for(cfg: DictConfig, cluster_info: dict[str, Any]) -> Path:
    """The prepared dataset the clustering ran on (recorded in cluster.json), else the config's."""
    recorded = cluster_info.get("prepared_dir")
    if recorded and is_complete(recorded):
        return Path(recorded)
    return prepared_dir(cfg)


def check_cluster_fits(cluster_dir: Path, info: dict[str, Any], fmap: FeatureMap) -> None:
    if list(info["vocab_sizes"]) != list(fmap.vocab_sizes):
        raise DataError(f"{cluster_dir}/cluster.json: its vocab sizes do not match the prepared dataset")
    for s in ("train", "val", "test"):
        n = len(info[f"assign_{s}"])
        if n != fmap.rows(s):
            raise DataError(
                f"{cluster_dir}/assign_{s}.npy: {n} assignments but the prepared {s} split has {fmap.rows(s)} rows"
            )


def check_cfg(cfg: DictConfig) -> None:
    """Every key the retrain stage will use, checked before any work."""
    from ..schedule import check_batch_size
    from ..training import check_fit_cfg, trainer_kwargs

    check_fit_cfg(cfg.retrain, "retrain")
    if str(cfg.retrain.init) not in INITS:
        raise ConfigError(
            f"config key 'retrain.init': must be one of {list(INITS)} (got '{cfg.retrain.init}')"
        )
    check_batch_size(cfg.model)
    trainer_kwargs(cfg)


def run(cfg: DictConfig, logger: Any = None) -> dict[str, Any]:
    """stage=retrain. ``logger``: a Lightning logger of the calling pipeline (else one is built)."""
    from .cluster import load_cluster_dir

    check_cfg(cfg)
    init = str(cfg.retrain.init)
    cluster_dir = resolve_cluster_dir(cfg)
    info = load_cluster_dir(cluster_dir)
    prepared = data_dir_for(cfg, info)
    fmap = FeatureMap.load(prepared)
    check_cluster_fits(cluster_dir, info, fmap)
    parents: dict[str, Any] = {"cluster_dir": cluster_dir}
    searched = None
    if init == "searched":
        ckpt = resolve_search_ckpt(cfg, cluster_dir)
        parents["search_ckpt"] = ckpt
        searched = load_search(ckpt, fmap)
        if searched.embed_dim != int(info["embed_dim"]):
            raise DataError(f"{ckpt}: embed dim {searched.embed_dim} != the clustering's {info['embed_dim']}")
    out = output_dir(cfg) / RETRAIN_DIR
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
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
            "prepared_dir": str(prepared.resolve()),
            "clusters": results,
        }
        write_json(out / "retrain.json", summary)
        write_manifest(out, make_manifest("retrain", cfg, CONFIG_KEYS, parents=parents))
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
    from .. import schedule

    dims = [int(d) for d in info["field_dims"][c]]
    kept = info["kept_dims"][c]
    masks = {s: np.asarray(info[f"assign_{s}"]) == c for s in ("train", "val", "test")}
    n = {s: int(m.sum()) for s, m in masks.items()}
    if n["train"] == 0:
        raise DataError(f"cluster {c} has no train samples (re-run stage=cluster with a smaller cluster.k)")
    bs = schedule.batch_size(cfg.model, n["train"])
    dm = make_datamodule(cfg, prepared, batch_size=bs, row_filter=masks)
    rate = dm.positive_rate("train")
    bias = schedule.prior_logit(rate) if cfg.model.get("output_bias", "prior") == "prior" else None
    seed_everything(int(cfg.seed) + c)
    module = RetrainModule(
        fmap.vocab_sizes,
        model_cfg,
        field_dims=dims,
        kept_dims=kept,
        cluster_id=c,
        field_names=fmap.field_names,
        output_bias=bias,
    )
    if searched is not None:
        module.init_from_searched(searched)
    log.info(
        "retrain stage: cluster %d: %d train / %d val / %d test samples (positive rate %.3f), field dims %s "
        "(MLP in %d, %d params), batch %d",
        c, n["train"], n["val"], n["test"], rate or 0.0, dims, sum(dims), module.model.num_parameters(), bs,
    )  # fmt: skip
    monitor = n["val"] > 0
    if not monitor:
        log.warning(
            "retrain stage: cluster %d has no val samples: no early stopping, the last epoch is kept", c
        )
    sub = PrefixedLogger(logger, f"retrain/cluster_{c}") if logger is not None else None
    with atomic_dir(cdir, overwrite=True) as tmp:
        res = fit_ctr(
            module,
            dm,
            cfg,
            tmp,
            max_epochs=int(cfg.retrain.max_epochs),
            patience=cfg.retrain.get("patience"),
            logger=sub,
            monitor_val=monitor,
            monitor=str(cfg.retrain.get("monitor", "val/logloss")),
        )
        res["best_ckpt"] = str((cdir / BEST).resolve())
        metrics = {
            "cluster": c,
            "field_dims": dims,
            "embedding_width": sum(dims),
            "samples": n,
            "batch_size": bs,
            "train_positive_rate": rate,
            "init": init,
            **res,
            "resumed": False,
        }
        write_json(tmp / "metrics.json", metrics)
        write_manifest(tmp, manifest)
    return metrics


def load_cluster_models(retrain_dir: Path, k: int) -> list[RetrainModule]:
    """The best retrained module of every cluster (one-line DataError for a missing one)."""
    mods = []
    for c in range(k):
        p = retrain_dir / f"cluster_{c}" / BEST
        if not p.is_file():
            raise DataError(f"{p}: missing retrained model of cluster {c} (re-run stage=retrain)")
        try:
            m = RetrainModule.load_from_checkpoint(str(p), map_location="cpu")
        except Exception as e:  # a corrupt / foreign checkpoint
            raise DataError(f"{p}: not a loadable retrain checkpoint ({type(e).__name__}: {e})") from e
        mods.append(m.eval())
    return mods
