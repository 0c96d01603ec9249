"""Routed evaluation of iHAS (paper section 3.4 inference path; Table 4 rows; Figure 4 inference time).

Each TEST sample goes through the searched embedding + Bernoulli gate (deterministic mode), the
nearest centroid picks its cluster, and that cluster's retrained model predicts it
(:class:`~ihas_lightning.routing.RoutedModel`). Reported, all on the whole test split:

* **iHAS** (routed): AUC and logloss pooled over the test set, plus per-cluster metrics;
* **iHAS-1**: the search model alone (deterministic masks; no clustering / retraining);
* **Base**: the gate-less model (``evaluate.base_ckpt``, default this run's ``base/search/best.ckpt``;
  the row is left out when there is none);
* parameters: embedding rows x dims + MLP of each model; for iHAS the sum of the cluster models,
  with the routing cost (search embedding + gate + centroids) reported separately;
* inference time of each over the whole test set in this process (min of
  ``evaluate.timing_repeats`` passes, batches of ``evaluate.batch_size``, data already in memory);
  for iHAS both the full routed path and the cluster models alone (given the routing).

Inputs: ``retrain.dir`` (default this run's ``retrain/``); the cluster dir and search checkpoint are
taken from the config (``cluster.dir``, ``search.ckpt``) or else from the manifests of the dirs before
them. Outputs: ``evaluate/{results.json, results.md, manifest.json}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ..artifacts import make_manifest, write_manifest
from ..data.feature_map import FeatureMap
from ..errors import ConfigError, DataError
from ..routing import RoutedModel, dispatch
from ..utils import read_json, write_json
from .common import (
    BASE_DIR,
    BEST,
    EVALUATE_DIR,
    SEARCH_DIR,
    _given,
    load_search,
    make_datamodule,
    output_dir,
    resolve_cluster_dir,
    resolve_retrain_dir,
    resolve_search_ckpt,
)

log = logging.getLogger("ihas_lightning")
CONFIG_KEYS = ["seed", "evaluate.batch_size", "evaluate.timing_repeats"]


def auc_logloss(logits: torch.Tensor, y: torch.Tensor) -> tuple[float | None, float | None]:
    if len(y) == 0:
        return None, None
    from sklearn.metrics import roc_auc_score

    ll = float(F.binary_cross_entropy_with_logits(logits.double(), y.double()))
    yy = y.numpy()
    auc = float(roc_auc_score(yy, torch.sigmoid(logits).numpy())) if 0 < yy.sum() < len(yy) else None
    return auc, ll


@torch.inference_mode()
def predict(fn: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([fn(x) for x in batches]) if batches else torch.zeros(0)


@torch.inference_mode()
def time_inference(
    fn: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor], repeats: int
) -> float:
    """Min over ``repeats`` of the wall time (ms) of one pass over ``batches``."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for x in batches:
            fn(x)
        best = min(best, time.perf_counter() - t0)
    return best * 1000.0


def base_checkpoint(cfg: DictConfig) -> Path | None:
    p = _given(cfg.evaluate.get("base_ckpt"))
    if p is not None:
        if not p.is_file():
            raise DataError(f"{p}: Base checkpoint not found (evaluate.base_ckpt)")
        return p
    p = output_dir(cfg) / BASE_DIR / SEARCH_DIR / BEST
    return p if p.is_file() else None


def run(cfg: DictConfig, logger: Any = None) -> dict[str, Any]:
    """stage=evaluate. ``logger``: a Lightning logger of the calling pipeline (else one is built)."""
    from ..loggers import build_logger, finish_loggers, log_table
    from ..report.tables import RESULT_COLUMNS, print_results, result_rows, results_markdown
    from .cluster import load_cluster_dir
    from .retrain import check_cluster_fits, data_dir_for, load_cluster_models
    from .search import load_search_model

    repeats = int(cfg.evaluate.get("timing_repeats", 3))
    if repeats < 1:
        raise ConfigError(f"config key 'evaluate.timing_repeats': must be >= 1 (got {repeats})")
    retrain_dir = resolve_retrain_dir(cfg)
    cluster_dir = resolve_cluster_dir(cfg, retrain_dir)
    cinfo = load_cluster_dir(cluster_dir)
    search_ckpt = resolve_search_ckpt(cfg, cluster_dir)
    prepared = data_dir_for(cfg, cinfo)
    fmap = FeatureMap.load(prepared)
    check_cluster_fits(cluster_dir, cinfo, fmap)
    search = load_search(search_ckpt, fmap)
    k = int(cinfo["k"])
    modules = load_cluster_models(retrain_dir, k)
    for c, m in enumerate(modules):
        if list(m.model.field_dims) != [int(d) for d in cinfo["field_dims"][c]]:
            raise DataError(
                f"{retrain_dir}/cluster_{c}/best.ckpt: its field dims differ from {cluster_dir}/cluster.json"
            )
    routed = RoutedModel(search, cinfo["centroids"], [m.model for m in modules]).eval()
    base_ckpt = base_checkpoint(cfg)
    base = load_search_model(base_ckpt, fmap).model.eval() if base_ckpt is not None else None

    bs = int(cfg.evaluate.batch_size)
    dm = make_datamodule(cfg, prepared, batch_size=bs)
    xs, ys = [], []
    for batch in dm.split_dataloader("test", shuffle=False, batch_size=bs):
        xs.append(torch.as_tensor(batch[0]).clone())
        ys.append(torch.as_tensor(batch[1]).clone())
    y = torch.cat(ys)
    n_test = len(y)

    # ---- predictions ---------------------------------------------------------------------------------
    with torch.inference_mode():
        outs = [routed.forward_with_clusters(x) for x in xs]
    routed_logits = torch.cat([o[0] for o in outs])
    clusters = torch.cat([o[1] for o in outs])
    stage_assign = torch.from_numpy(np.asarray(cinfo["assign_test"]).astype(np.int64))
    agree = float((clusters == stage_assign).float().mean()) if len(stage_assign) == n_test else None
    ihas1_logits = predict(lambda x: search(x, "deterministic"), xs)
    base_logits = predict(lambda x: base(x, "open"), xs) if base is not None else None

    # ---- timing (same process, same batches) ----------------------------------------------------------
    cluster_batches = [routed.route(x) for x in xs]
    models = list(routed.cluster_models)
    timing = {
        "ihas": time_inference(routed, xs, repeats),
        "ihas_models_only": time_inference_pairs(models, xs, cluster_batches, repeats),
        "ihas1": time_inference(lambda x: search(x, "deterministic"), xs, repeats),
    }
    if base is not None:
        timing["base"] = time_inference(lambda x: base(x, "open"), xs, repeats)

    # ---- metrics ---------------------------------------------------------------------------------------
    auc, ll = auc_logloss(routed_logits, y)
    a1, l1 = auc_logloss(ihas1_logits, y)
    per_cluster = []
    for c in range(k):
        sel = clusters == c
        ca, cl = auc_logloss(routed_logits[sel], y[sel])
        per_cluster.append(
            {
                "cluster": c,
                "test_samples": int(sel.sum()),
                "test_auc": ca,
                "test_logloss": cl,
                "field_dims": [int(d) for d in cinfo["field_dims"][c]],
                "embedding_width": int(sum(cinfo["field_dims"][c])),
                "params": int(models[c].num_parameters()),
            }
        )
    cluster_params = sum(p["params"] for p in per_cluster)
    rows: list[dict[str, Any]] = []
    if base is not None:
        ba, bl = auc_logloss(base_logits, y)
        rows.append({"model": "Base", "test_auc": ba, "test_logloss": bl, "params": int(base.num_parameters()),
                     "inference_ms": timing["base"], "note": "no gates, all fields x 16 dims"})  # fmt: skip
    rows.append({"model": "iHAS-1", "test_auc": a1, "test_logloss": l1, "params": int(search.num_parameters()),
                 "inference_ms": timing["ihas1"], "note": "search model alone, deterministic masks"})  # fmt: skip
    rows.append(
        {
            "model": "iHAS",
            "test_auc": auc,
            "test_logloss": ll,
            "params": int(cluster_params),
            "inference_ms": timing["ihas"],
            "note": f"routed to {k} cluster models (models alone: {timing['ihas_models_only']:.1f} ms; "
            f"+{routed.routing_parameters():,} routing params)",
        }
    )
    results: dict[str, Any] = {
        "dataset": str(cfg.dataset.name),
        "test_rows": n_test,
        "batch_size": bs,
        "timing_repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "per_cluster": per_cluster,
        "routing_params": int(routed.routing_parameters()),
        "cluster_params": [p["params"] for p in per_cluster],
        "timing_ms": timing,
        "routing_agrees_with_cluster_stage": agree,
        "inputs": {
            "search_ckpt": str(search_ckpt.resolve()),
            "cluster_dir": str(cluster_dir.resolve()),
            "retrain_dir": str(retrain_dir.resolve()),
            "base_ckpt": str(base_ckpt.resolve()) if base_ckpt else None,
            "prepared_dir": str(prepared.resolve()),
        },
    }
    if "recovery" in cinfo:
        results["recovery"] = cinfo["recovery"]
    truth = prepared / "truth.json"
    if truth.is_file():
        results["bayes_test_auc"] = read_json(truth).get("bayes_test_auc")

    out = output_dir(cfg) / EVALUATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    (out / "results.md").write_text(results_markdown(results))
    parents: dict[str, Any] = {
        "retrain_dir": retrain_dir,
        "cluster_dir": cluster_dir,
        "search_ckpt": search_ckpt,
    }
    if base_ckpt is not None:
        parents["base_ckpt"] = base_ckpt
    write_manifest(out, make_manifest("evaluate", cfg, CONFIG_KEYS, parents=parents))
    print_results(results)

    metrics = flat_metrics(results)
    own = logger is None
    if own:
        logger = build_logger(cfg, f"{cfg.tag}")
    try:
        if logger is not None:
            logger.log_metrics({k_: float(v) for k_, v in metrics.items() if v is not None})
            log_table(logger, "evaluate/results", RESULT_COLUMNS, result_rows(results))
            if "recovery" in results:
                from ..report.tables import RECOVERY_COLUMNS, recovery_rows

                log_table(logger, "evaluate/recovery", RECOVERY_COLUMNS, recovery_rows(results["recovery"]))
    finally:
        if own:
            finish_loggers()
    return metrics


@torch.inference_mode()
def time_inference_pairs(
    models: list, xs: list[torch.Tensor], clusters: list[torch.Tensor], repeats: int
) -> float:
    """Like :func:`time_inference` for the cluster models alone, the routing precomputed."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for x, c in zip(xs, clusters):
            dispatch(x, c, models)
        best = min(best, time.perf_counter() - t0)
    return best * 1000.0


def flat_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """Scalar metrics for loggers / the sweeper: ``routed/test/auc`` etc."""
    names = {"Base": "base", "iHAS-1": "ihas1", "iHAS": "routed"}
    m: dict[str, Any] = {}
    for r in results["rows"]:
        p = names[r["model"]]
        m[f"{p}/test/auc"] = r["test_auc"]
        m[f"{p}/test/logloss"] = r["test_logloss"]
        m[f"{p}/params"] = r["params"]
        m[f"{p}/inference_ms"] = r["inference_ms"]
    m["routed/routing_params"] = results["routing_params"]
    m["routed/models_only_ms"] = results["timing_ms"]["ihas_models_only"]
    for c in results["per_cluster"]:
        m[f"routed/cluster_{c['cluster']}/test/auc"] = c["test_auc"]
        m[f"routed/cluster_{c['cluster']}/test_samples"] = c["test_samples"]
    if "recovery" in results:
        for r in results["recovery"]["per_cluster"]:
            m[f"recovery/cluster_{r['cluster']}/f1"] = r["f1"]
        m["recovery/min_f1"] = results["recovery"]["min_f1"]
    return m
