"""Routed evaluation of iHAS (paper section 3.4 inference path; Table 4 rows; Figure 4 inference time).

Each sample goes through the searched embedding + Bernoulli gate (deterministic mode), the
nearest centroid picks its cluster, and that cluster's retrained model predicts it
(:class:`~ihas_lightning.routing.RoutedModel`). Reported on the whole validation and test splits
(validation: what a user may compare without touching test; the sweeper's objective):

* **iHAS** (routed): AUC and logloss pooled over the split, and per cluster side by side (a routed
  model whose clusters rank well separately but are mis-calibrated against each other shows as a
  pooled AUC below the per-cluster ones);
* **iHAS-1**: the search model alone (deterministic masks; no clustering / retraining);
* **Base**: the gate-less model (``evaluate.base_ckpt``, default this run's ``base/search/best.ckpt``;
  the row is left out when there is none);
* **Constant**: predicting the train base rate (logloss only; AUC 0.5), the floor every model must beat;
* parameters: embedding rows x dims + MLP of each model; for iHAS the sum of the cluster models,
  with the routing cost (search embedding + gate + centroids) reported separately;
* inference time of each over the whole test set in this process (min of
  ``evaluate.timing_repeats`` passes, batches of ``evaluate.batch_size``, data already in memory);
  for iHAS both the full routed path and the cluster models alone (given the routing).

Warnings (logged, and in ``results.json``/``results.md``): a model whose val or test logloss is no
better than the constant predictor's, and iHAS below Base on validation by more than 0.001.

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


SPLITS = ("val", "test")
# the paper calls a difference of 0.001 AUC / logloss significant
SIGNIFICANT = 0.001


def constant_logloss(y: torch.Tensor, rate: float) -> float | None:
    """Logloss of predicting the constant ``rate`` (the train base rate) for every row of ``y``."""
    if len(y) == 0:
        return None
    p = min(max(float(rate), 1e-7), 1 - 1e-7)
    yy = y.double()
    return float(-(yy * np.log(p) + (1 - yy) * np.log(1 - p)).mean())


def evaluate_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """One line per problem a user must not miss: a model no better than the constant predictor, and
    iHAS below Base on validation (the split the user may look at without touching test)."""
    by = {r["model"]: r for r in rows}
    const = by["Constant"]
    out = []
    for name in ("Base", "iHAS-1", "iHAS"):
        r = by.get(name)
        if r is None:
            continue
        for split in ("val", "test"):
            ll, cl = r.get(f"{split}_logloss"), const.get(f"{split}_logloss")
            if ll is not None and cl is not None and ll >= cl:
                out.append(
                    f"{name} has not trained: its {split} logloss {ll:.4f} is no better than predicting the "
                    f"train base rate ({cl:.4f})"
                )
    if "Base" in by and "iHAS" in by:
        b, i = by["Base"], by["iHAS"]
        if (
            b["val_auc"] is not None
            and i["val_auc"] is not None
            and i["val_auc"] < b["val_auc"] - SIGNIFICANT
        ):
            out.append(
                f"iHAS loses to Base on validation: AUC {i['val_auc']:.4f} vs {b['val_auc']:.4f} "
                f"({i['val_auc'] - b['val_auc']:+.4f})"
            )
        if (
            b["val_logloss"] is not None
            and i["val_logloss"] is not None
            and (i["val_logloss"] > b["val_logloss"] + SIGNIFICANT)
        ):
            out.append(
                f"iHAS loses to Base on validation: logloss {i['val_logloss']:.4f} vs {b['val_logloss']:.4f}"
            )
    return out


def _split_batches(dm: Any, split: str, bs: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    xs, ys = [], []
    for batch in dm.split_dataloader(split, shuffle=False, batch_size=bs):
        xs.append(torch.as_tensor(batch[0]).clone())
        ys.append(torch.as_tensor(batch[1]).clone())
    return xs, torch.cat(ys) if ys else torch.zeros(0)


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


def check_cfg(cfg: DictConfig) -> None:
    for key in ("timing_repeats", "batch_size"):
        v = cfg.evaluate.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"config key 'evaluate.{key}': must be an integer >= 1 (got {v!r})")


def run(cfg: DictConfig, logger: Any = None) -> dict[str, Any]:
    """stage=evaluate. ``logger``: a Lightning logger of the calling pipeline (else one is built)."""
    from ..loggers import build_logger, finish_loggers, log_table
    from ..report.tables import RESULT_COLUMNS, print_results, result_rows, results_markdown
    from .cluster import load_cluster_dir
    from .retrain import check_cluster_fits, data_dir_for, load_cluster_models
    from .search import load_search_model

    check_cfg(cfg)
    repeats = int(cfg.evaluate.get("timing_repeats", 3))
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
    routed = RoutedModel(
        search,
        cinfo["centroids"],
        [m.model for m in modules],
        input=str(cinfo.get("input", "masked_embedding")),
    ).eval()
    base_ckpt = base_checkpoint(cfg)
    base = load_search_model(base_ckpt, fmap).model.eval() if base_ckpt is not None else None

    bs = int(cfg.evaluate.batch_size)
    dm = make_datamodule(cfg, prepared, batch_size=bs)
    data = {s: _split_batches(dm, s, bs) for s in SPLITS}
    xs, y = data["test"]
    n_test = len(y)
    prior = fmap.splits.get("train", {}).get("pos_rate")
    if prior is None:
        prior = dm.positive_rate("train")

    # ---- predictions (val: what selection and the warnings use; test: the reported numbers) ------------
    logits: dict[str, dict[str, torch.Tensor]] = {}
    clusters: dict[str, torch.Tensor] = {}
    for split, (bx, _) in data.items():
        with torch.inference_mode():
            outs = [routed.forward_with_clusters(x) for x in bx]
        clusters[split] = torch.cat([o[1] for o in outs]) if outs else torch.zeros(0, dtype=torch.long)
        logits[split] = {
            "iHAS": torch.cat([o[0] for o in outs]) if outs else torch.zeros(0),
            "iHAS-1": predict(lambda x: search(x, "deterministic"), bx),
        }
        if base is not None:
            logits[split]["Base"] = predict(lambda x: base(x, "open"), bx)
    stage_assign = torch.from_numpy(np.asarray(cinfo["assign_test"]).astype(np.int64))
    agree = float((clusters["test"] == stage_assign).float().mean()) if len(stage_assign) == n_test else None

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
    metrics_of = {
        split: {name: auc_logloss(lg, data[split][1]) for name, lg in per.items()}
        for split, per in logits.items()
    }
    constant = {split: constant_logloss(data[split][1], prior) for split in SPLITS}
    per_cluster = []
    for c in range(k):
        entry: dict[str, Any] = {"cluster": c}
        for split in ("val", "test"):
            sel = clusters[split] == c
            ca, cl = auc_logloss(logits[split]["iHAS"][sel], data[split][1][sel])
            entry.update({f"{split}_samples": int(sel.sum()), f"{split}_auc": ca, f"{split}_logloss": cl})
            entry[f"{split}_positive_rate"] = float(data[split][1][sel].mean()) if int(sel.sum()) else None
        entry.update(
            field_dims=[int(d) for d in cinfo["field_dims"][c]],
            embedding_width=int(sum(cinfo["field_dims"][c])),
            params=int(models[c].num_parameters()),
        )
        per_cluster.append(entry)
    cluster_params = sum(p["params"] for p in per_cluster)
    notes = {
        "Base": "no gates, all fields x 16 dims",
        "iHAS-1": "search model alone, deterministic masks",
        "iHAS": f"routed to {k} cluster models (models alone: {timing['ihas_models_only']:.1f} ms; "
        f"+{routed.routing_parameters():,} routing params)",
    }
    params = {"iHAS-1": int(search.num_parameters()), "iHAS": int(cluster_params)}
    ms = {"iHAS-1": timing["ihas1"], "iHAS": timing["ihas"]}
    if base is not None:
        params["Base"], ms["Base"] = int(base.num_parameters()), timing["base"]
    rows: list[dict[str, Any]] = []
    for name in ("Base", "iHAS-1", "iHAS"):
        if name not in metrics_of["test"]:
            continue
        (va, vl), (ta, tl) = metrics_of["val"][name], metrics_of["test"][name]
        rows.append({"model": name, "test_auc": ta, "test_logloss": tl, "val_auc": va, "val_logloss": vl,
                     "params": params[name], "inference_ms": ms[name], "note": notes[name]})  # fmt: skip
    rows.append({"model": "Constant", "test_auc": 0.5, "test_logloss": constant["test"], "val_auc": 0.5,
                 "val_logloss": constant["val"], "params": 1, "inference_ms": None,
                 "note": f"predicts the train base rate {prior:.4f}"})  # fmt: skip
    warnings = evaluate_warnings(rows)
    for w in warnings:
        log.warning("evaluate: %s", w)
    results: dict[str, Any] = {
        "dataset": str(cfg.dataset.name),
        "test_rows": n_test,
        "val_rows": len(data["val"][1]),
        "batch_size": bs,
        "timing_repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "per_cluster": per_cluster,
        "cluster_input": routed.input,
        "train_positive_rate": prior,
        "routing_params": int(routed.routing_parameters()),
        "cluster_params": [p["params"] for p in per_cluster],
        "timing_ms": timing,
        "routing_agrees_with_cluster_stage": agree,
        "warnings": warnings,
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
    names = {"Base": "base", "iHAS-1": "ihas1", "iHAS": "routed", "Constant": "constant"}
    m: dict[str, Any] = {}
    for r in results["rows"]:
        p = names[r["model"]]
        for split in ("val", "test"):
            m[f"{p}/{split}/auc"] = r.get(f"{split}_auc")
            m[f"{p}/{split}/logloss"] = r.get(f"{split}_logloss")
        m[f"{p}/params"] = r["params"]
        m[f"{p}/inference_ms"] = r["inference_ms"]
    m["routed/routing_params"] = results["routing_params"]
    m["routed/models_only_ms"] = results["timing_ms"]["ihas_models_only"]
    for c in results["per_cluster"]:
        for split in ("val", "test"):
            m[f"routed/cluster_{c['cluster']}/{split}/auc"] = c[f"{split}_auc"]
            m[f"routed/cluster_{c['cluster']}/{split}_samples"] = c[f"{split}_samples"]
    if "recovery" in results:
        for r in results["recovery"]["per_cluster"]:
            m[f"recovery/cluster_{r['cluster']}/f1"] = r["f1"]
        m["recovery/min_f1"] = results["recovery"]["min_f1"]
    return m
