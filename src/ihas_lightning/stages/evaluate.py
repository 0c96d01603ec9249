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
* inference time of each on a fixed number of test rows, ``evaluate.timing_rows`` (100k: the test
  split drawn with replacement, seeded, when it is smaller; a seeded sample of it when larger), so
  the per-call overhead of a small split does not decide the figure (min of
  ``evaluate.timing_repeats`` passes, batches of ``evaluate.batch_size``, data already in memory).
  The final row is timed on the path it is served with: for routed iHAS the routing that
  ``routing=auto`` picks (the fast routing where it is judged within 0.001 AUC of the exact one on
  validation, else the exact), with the exact routing's time beside it (``inference_exact_ms``), and
  the cluster models alone (given the routing). Each split is scored once per model; the timing
  passes run on the fixed sample only;
* **heterogeneity** (routed iHAS): how much the clusters' per-field kept dims (and, without the majority
  rule's threshold, their expected open dims) differ, against the same
  statistic with the validation samples' cluster assignments permuted and the architectures
  re-derived by the retraining stage's majority rule (:func:`ihas_lightning.stats.heterogeneity_test`;
  ``docs/heterogeneity.md``).

Warnings (logged, and in ``results.json``/``results.md``): a model whose val or test logloss is no
better than the constant predictor's, and iHAS below Base on validation by more than 0.001.

The retrain guard (``retrain_guard`` in results.json, a line in results.md; per cluster ``fallback`` and its
bounds): how many retrained cluster models were replaced by Base's model (``method.retrain_guard: base``).

Inputs: ``retrain.dir`` (default this run's ``retrain/``); the cluster dir and search checkpoint are
taken from the config (``cluster.dir``, ``search.ckpt``) or else from the manifests of the dirs before
them. Outputs: ``evaluate/{results.json, results.md, manifest.json}`` and ``evaluate/test_scores.npz``
(the test labels and the final row's logits, for paired comparisons across runs in the sweep report).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from .. import method
from ..artifacts import make_manifest, write_manifest
from ..errors import ConfigError
from ..routing import dispatch, nearest_centroid
from ..rundir import (
    EVALUATE_DIR,
    make_datamodule,
    output_dir,
    split_batches,
)
from ..serving import auc_logloss, base_checkpoint, load_run_models  # noqa: F401 - re-exported
from ..stats import heterogeneity_test, paired_auc_difference
from ..utils import read_json, write_json

log = logging.getLogger("ihas_lightning")
CONFIG_KEYS = [
    "seed",
    "evaluate.batch_size",
    "evaluate.timing_repeats",
    "evaluate.timing_rows",
    "evaluate.permutations",
    "evaluate.heterogeneity_rows",
    "retrain.keep_threshold",
]


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


def evaluate_warnings(rows: list[dict[str, Any]], final: str = "iHAS") -> list[str]:
    """One line per problem a user must not miss: a model no better than the constant predictor, and
    the method's final model (``final``) below Base on validation (the split the user may look at
    without touching test)."""
    by = {r["model"]: r for r in rows}
    const = by["Constant"]
    out = []
    for r in rows:
        name = r["model"]
        if name == "Constant":
            continue
        for split in ("val", "test"):
            ll, cl = r.get(f"{split}_logloss"), const.get(f"{split}_logloss")
            if ll is not None and cl is not None and ll >= cl:
                out.append(
                    f"{name} has not trained: its {split} logloss {ll:.4f} is no better than predicting the "
                    f"train base rate ({cl:.4f})"
                )
    if "Base" in by and final in by and final != "Base":
        b, i = by["Base"], by[final]
        if (
            b["val_auc"] is not None
            and i["val_auc"] is not None
            and i["val_auc"] < b["val_auc"] - SIGNIFICANT
        ):
            out.append(
                f"{final} loses to Base on validation: AUC {i['val_auc']:.4f} vs {b['val_auc']:.4f} "
                f"({i['val_auc'] - b['val_auc']:+.4f})"
            )
        if (
            b["val_logloss"] is not None
            and i["val_logloss"] is not None
            and (i["val_logloss"] > b["val_logloss"] + SIGNIFICANT)
        ):
            out.append(
                f"{final} loses to Base on validation: logloss {i['val_logloss']:.4f} vs {b['val_logloss']:.4f}"
            )
    return out


@torch.inference_mode()
def predict(fn: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([fn(x) for x in batches]) if batches else torch.zeros(0)


@torch.inference_mode()
def time_inference(
    fn: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor], repeats: int
) -> float:
    """Min over ``repeats`` of the wall time (ms) of one pass over ``batches``, after one warm-up batch."""
    if batches:
        fn(batches[0])
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for x in batches:
            fn(x)
        best = min(best, time.perf_counter() - t0)
    return best * 1000.0


@torch.inference_mode()
def exact_routed_pass(
    routed: Any, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact routing's forward (:meth:`RoutedModel.forward_with_clusters` with ``fast`` off: the
    searched embedding + gate, the nearest centroid, that cluster's model) and, from the same embedding
    and gate pass, the search model's own deterministic logits (iHAS-1) and each row's 0/1 gate mask:
    (routed logits [B], cluster [B], mask [B, F*d], search logits [B]). The gate (N*d x N*d) is the
    costly part of both, so the two rows share it."""
    search = routed.search_model
    e = search.embed(x)
    h, aux = search.select(e, x, "deterministic")
    mask = aux["mask"]
    feats = {"masked_embedding": h, "mask": mask, "probs": aux.get("p")}[routed.input]
    c = nearest_centroid(feats, routed.centroids)
    return dispatch(x, c, routed.cluster_models), c, mask, search.backbone(h, x)


def timing_sample(xs: list[torch.Tensor], rows: int, seed: int) -> tuple[torch.Tensor, bool]:
    """``rows`` test rows to time on, seeded: drawn with replacement when the split is smaller, a sample
    without replacement when it is larger (an empty tensor for an empty split). (rows, replaced)."""
    if not xs:
        return torch.zeros(0), False
    x = torch.cat(xs)
    n = len(x)
    if n == 0:
        return x, False
    g = torch.Generator().manual_seed(int(seed))
    if n >= rows:
        return x[torch.randperm(n, generator=g)[:rows]], False
    return x[torch.randint(n, (rows,), generator=g)], True


def rows_by(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(r for r in rows if r["model"] == name)


def check_cfg(cfg: DictConfig) -> None:
    for key, low in (("timing_repeats", 1), ("batch_size", 1), ("timing_rows", 1), ("permutations", 0),
                     ("heterogeneity_rows", 1)):  # fmt: skip
        v = cfg.evaluate.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ConfigError(f"config key 'evaluate.{key}': must be an integer >= {low} (got {v!r})")


def _counts(model: Any) -> dict[str, int]:
    c = model.parameter_counts()
    return {"embedding": c["embedding"], "dense": c["dense"] + c["selector"], "index": c["index"]}


def run(cfg: DictConfig, logger: Any = None) -> dict[str, Any]:
    """stage=evaluate: one row per model the run dir holds (Base, the method's search model, its
    retrained / routed model), plus the constant predictor. ``logger``: a Lightning logger of the
    calling pipeline (else one is built)."""
    check_cfg(cfg)
    rm = load_run_models(cfg)
    bs = int(cfg.evaluate.batch_size)
    dm = make_datamodule(cfg, rm.prepared, batch_size=bs)
    data = {s: split_batches(dm, s, bs) for s in SPLITS}
    prior = rm.fmap.splits.get("train", {}).get("pos_rate")
    if prior is None:
        prior = dm.positive_rate("train")
    het_pick = _heterogeneity_pick(cfg, data, rm.routed)
    with _gate_folded(rm):  # scoring only: the timing below times the gate as served (its matmul)
        scored = _score_splits(rm, data, het_pick)
    timing, tx, replaced = _timing(cfg, rm, data["test"][0], bs)
    rows = _rows(rm, scored, data, timing, prior)
    warnings = evaluate_warnings(rows, final=rm.final)
    fast_routing = _fast_routing(rm, rows, scored, data, warnings)
    served, served_why = served_routing(fast_routing, rm.routed is not None)
    if rm.routed is not None and served == "fast":
        # the final row's time is the path routing=auto serves; the exact routing's stays beside it
        rows_by(rows, rm.final).update(
            inference_ms=timing[f"{rm.final} (fast routing)"], served_routing="fast"
        )
    het = _heterogeneity(cfg, rm, scored, het_pick)
    for w in warnings:
        log.warning("evaluate: %s", w)
    served_info = {"served_routing": served, "served_routing_reason": served_why}
    results = _results(cfg, rm, data, rows, timing, warnings, prior, bs, (len(tx), replaced), served_info)
    case = _routed_results(results, rm, scored, data, timing, fast_routing, het)
    _method_extras(cfg, rm, results)
    out = _write_outputs(cfg, rm, results, scored, data, case)
    metrics = flat_metrics(results)
    _log_results(cfg, logger, results, case, out, metrics)
    return metrics


@contextmanager
def _gate_folded(rm):
    """The searched model's gate folded into its id table while the splits are scored
    (:meth:`~ihas_lightning.models.dlrm.DLRM.fold_gate`: the same masks in 1/d of the work)."""
    models = {id(m): m for m in (rm.search, getattr(rm.routed, "search_model", None)) if m is not None}
    folded = [m for m in models.values() if hasattr(m, "fold_gate")]
    for m in folded:
        log.info("evaluate: the search model's gate %s", m.fold_gate())
    try:
        yield
    finally:
        for m in folded:
            m.unfold_gate()


def _heterogeneity_pick(cfg: DictConfig, data, routed) -> torch.Tensor | None:
    """A seeded subset of the validation rows whose gate masks the heterogeneity test keeps."""
    if routed is None:
        return None
    n_val = sum(len(x) for x in data["val"][0])
    g = torch.Generator().manual_seed(int(cfg.seed))
    pick = torch.zeros(n_val, dtype=torch.bool)
    pick[torch.randperm(n_val, generator=g)[: min(int(cfg.evaluate.heterogeneity_rows), n_val)]] = True
    return pick


def _score_splits(rm, data, het_pick) -> dict[str, Any]:
    """Each split scored once per model (val: what selection and the warnings use; test: the reported
    numbers). The exact routing's pass also scores the iHAS-1 row (one embedding + gate pass for both),
    gives each sample's cluster, and keeps the gate masks of ``het_pick``'s validation rows."""
    routed = rm.routed
    logits: dict[str, dict[str, torch.Tensor]] = {}
    clusters: dict[str, torch.Tensor] = {}  # the exact routing's
    fast_clusters: dict[str, torch.Tensor] = {}  # the distilled router's
    het_masks: list[torch.Tensor] = []
    shared_search = (
        rm.search_row if routed is not None and rm.search_row and routed.search_model is rm.search else None
    )
    for split, (bx, _) in data.items():
        logits[split] = {}
        for row, fn, _m, _n in rm.entries:
            if row == shared_search:
                continue
            if fn is routed:
                outs, search_out = _exact_pass(routed, bx, het_pick if split == "val" else None, het_masks)
                if shared_search is not None:
                    logits[split][shared_search] = torch.cat(search_out) if search_out else torch.zeros(0)
            elif fn is not None and fn is rm.routed_fast:
                with torch.inference_mode():
                    outs = [fn.forward_with_clusters(x) for x in bx]
            else:
                logits[split][row] = predict(fn, bx)
                continue
            (clusters if fn is routed else fast_clusters)[split] = (
                torch.cat([o[1] for o in outs]) if outs else torch.zeros(0, dtype=torch.long)
            )
            logits[split][row] = torch.cat([o[0] for o in outs]) if outs else torch.zeros(0)
    return {"logits": logits, "clusters": clusters, "fast_clusters": fast_clusters, "het_masks": het_masks}


def _exact_pass(routed, bx, pick, masks: list[torch.Tensor]):
    """The exact routing over batches ``bx``: ([(logits, clusters)], [search logits]); the gate masks of
    the rows ``pick`` marks are appended to ``masks``."""
    outs, search_out, start = [], [], 0
    with torch.inference_mode():
        for x in bx:
            lg, c, mask, slg = exact_routed_pass(routed, x)
            outs.append((lg, c))
            search_out.append(slg)
            if pick is not None:
                masks.append(mask[pick[start : start + len(x)]].to(torch.uint8))
            start += len(x)
    return outs, search_out


def _timing(cfg: DictConfig, rm, xs, bs: int):
    """Inference time of every row on a fixed number of test rows (same process, same batches, warm-up,
    loading excluded), and of the cluster models alone given the routing: (timing, rows, replaced)."""
    repeats = int(cfg.evaluate.timing_repeats)
    tx, replaced = timing_sample(xs, int(cfg.evaluate.timing_rows), int(cfg.seed))
    tbatches = list(tx.split(bs)) if len(tx) else []
    timing = {row: time_inference(fn, tbatches, repeats) for row, fn, _m, _n in rm.entries}
    if rm.routed is not None:
        with torch.inference_mode():
            cluster_batches = [rm.routed.route(x) for x in tbatches]
        timing["routed_models_only"] = time_inference_pairs(
            list(rm.routed.cluster_models), tbatches, cluster_batches, repeats
        )
    return timing, tx, replaced


def _summed_counts(modules) -> dict[str, int]:
    counts = {"embedding": 0, "dense": 0, "index": 0}
    for m in modules:
        for key, v in _counts(m.model).items():
            counts[key] += v
    return counts


def _rows(rm, scored, data, timing, prior: float) -> list[dict[str, Any]]:
    """One row per model (val/test AUC and logloss, parameters, inference time), then the constant's."""
    logits = scored["logits"]
    metrics_of = {
        split: {row: auc_logloss(lg, data[split][1]) for row, lg in per.items()}
        for split, per in logits.items()
    }
    rows: list[dict[str, Any]] = []
    for row, fn, model, note in rm.entries:
        (va, vl), (ta, tl) = metrics_of["val"][row], metrics_of["test"][row]
        if fn is rm.routed_fast:
            counts = _summed_counts(rm.modules)
            note = f"distilled router ({sum(p.numel() for p in rm.routed_fast.router.parameters()):,} params)"
        elif fn is rm.routed:
            counts = _summed_counts(rm.modules)
            note = (f"{rm.k} clusters (models alone {timing['routed_models_only']:.1f} ms; "
                    f"+{rm.routed.routing_parameters():,} routing params)")  # fmt: skip
        else:
            counts = _counts(model)
        rows.append({"model": row, "test_auc": ta, "test_logloss": tl, "val_auc": va, "val_logloss": vl,
                     "params": counts["embedding"] + counts["dense"], "embedding_params": counts["embedding"],
                     "dense_params": counts["dense"], "index_entries": counts["index"],
                     "inference_ms": timing[row], "inference_exact_ms": timing[row] if fn is rm.routed else None,
                     "served_routing": "exact" if fn is rm.routed else None, "note": note})  # fmt: skip
    constant = {split: constant_logloss(data[split][1], prior) for split in SPLITS}
    rows.append({"model": "Constant", "test_auc": 0.5, "test_logloss": constant["test"], "val_auc": 0.5,
                 "val_logloss": constant["val"], "params": 1, "inference_ms": None,
                 "note": f"predicts the train base rate {prior:.4f}"})  # fmt: skip
    return rows


def _fast_routing(rm, rows, scored, data, warnings: list[str]) -> dict[str, Any] | None:
    """The distilled router against the exact routing: agreement, the paired AUC difference per split
    (DeLong) and whether it is within 0.001 (:func:`fast_routing_report`); None without one."""
    if rm.routed_fast is None:
        return None
    logits, clusters, fast = scored["logits"], scored["clusters"], scored["fast_clusters"]
    agreement = {
        split: float((fast[split] == clusters[split]).float().mean()) if len(clusters[split]) else None
        for split in SPLITS
    }
    fast_row = next(r for r in rows if r["model"] == f"{rm.final} (fast routing)")
    differences = {
        split: {
            **paired_auc_difference(
                data[split][1].numpy(),
                logits[split][fast_row["model"]].numpy(),
                logits[split][rm.final].numpy(),
            ),
            "rerouted": int((fast[split] != clusters[split]).sum()),
        }
        for split in SPLITS
    }
    report, warning = fast_routing_report(fast_row, rows_by(rows, rm.final), agreement, differences)
    t, (lo, hi) = report["test_auc_minus_exact"], report["test_auc_minus_exact_ci95"]
    if t is not None and lo is not None:
        log.info("evaluate: fast routing - exact routing, test AUC %+.4f (95%% CI [%+.4f, %+.4f]): within %s: %s",
                 t, lo, hi, SIGNIFICANT, report[f"test_within_{SIGNIFICANT}"])  # fmt: skip
    if warning:
        warnings.append(warning)
    return report


def _heterogeneity(cfg: DictConfig, rm, scored, het_pick) -> dict[str, Any] | None:
    if rm.routed is None:
        return None
    masks, clusters = scored["het_masks"], scored["clusters"]
    het = heterogeneity_report(
        torch.cat(masks) if masks else torch.zeros(0, 0),
        clusters["val"][het_pick] if het_pick is not None and len(clusters["val"]) else torch.zeros(0),
        rm.ainfo, rm.k, float(cfg.retrain.keep_threshold), int(cfg.evaluate.permutations), int(cfg.seed),
    )  # fmt: skip
    log.info("evaluate: heterogeneity of the clusters' dims %.3f (null mean %s over %d permutations), p = %s",
             het["statistic"] or 0.0, het["null_mean"], het["permutations"], het["p_value"])  # fmt: skip
    return het


def _row_keys(cfg: DictConfig, rm) -> dict[str, str]:
    """results.json's row names -> the flat metric keys (base, ihas1, routed, ...)."""
    name, final = str(cfg.method.name), rm.final
    keys = {"Base": "base", "Constant": "constant"}
    search_row = method.row_name(cfg, "search")
    if name == "ihas":
        keys.update({search_row or "iHAS-1": "ihas1", final: "routed"})
    elif method.has_selector(cfg):
        if len(rm.entries) and rm.entries[-1][0] != (search_row or name):
            keys[search_row or name] = "search"
        keys[final] = "final"
    return keys


def _results(
    cfg: DictConfig, rm, data, rows, timing, warnings, prior, bs: int, sample, served
) -> dict[str, Any]:
    """results.json's common part; ``sample`` = (timed rows, drawn with replacement?), ``served`` = the
    served routing and why."""
    name = str(cfg.method.name)
    n_timed, replaced = sample
    repeats = int(cfg.evaluate.timing_repeats)
    arch_dir, retrain_dir, base_ckpt = rm.arch_dir, rm.retrain_dir, rm.base_ckpt
    return {
        "dataset": str(cfg.dataset.name),
        "method": name,
        "display": str(cfg.method.get("display") or name),
        "final_row": rm.final,
        "backbone": str(cfg.model.backbone),
        "transfer_from": str(method.transfer_dir(cfg)) if method.transferring(cfg) else None,
        "row_keys": _row_keys(cfg, rm),
        "test_rows": len(data["test"][1]),
        "val_rows": len(data["val"][1]),
        "batch_size": bs,
        "timing_repeats": repeats,
        "timing_rows": int(n_timed),
        "timing_rows_replaced": replaced,
        "timing_note": (
            f"{n_timed:,} test rows ({'drawn with replacement from' if replaced else 'a sample of'} the "
            f"{len(data['test'][1]):,}-row split, seeded) in memory, batches of {bs}, one warm-up batch, min "
            f"of {repeats} passes; the final model on the path it is served with"
        ),
        **served,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "per_cluster": [],
        "train_positive_rate": prior,
        "timing_ms": timing,
        "warnings": warnings,
        "inputs": {
            "search_ckpt": str(rm.search_ckpt.resolve()),
            "arch_dir": str(arch_dir.resolve()) if arch_dir else None,
            "cluster_dir": str(arch_dir.resolve()) if rm.routed is not None else None,
            "retrain_dir": str(retrain_dir.resolve()) if retrain_dir else None,
            "base_ckpt": str(base_ckpt.resolve()) if base_ckpt else None,
            "prepared_dir": str(rm.prepared.resolve()),
        },
    }


def _per_cluster(rm, scored, data) -> list[dict[str, Any]]:
    """Each cluster's samples, AUC, logloss and positive rate per split, its kept dims and parameters."""
    logits, clusters = scored["logits"], scored["clusters"]
    out = []
    for c in range(rm.k):
        entry: dict[str, Any] = {"cluster": c}
        for split in SPLITS:
            sel = clusters[split] == c
            ca, cl = auc_logloss(logits[split][rm.final][sel], data[split][1][sel])
            entry.update({f"{split}_samples": int(sel.sum()), f"{split}_auc": ca, f"{split}_logloss": cl})
            entry[f"{split}_positive_rate"] = float(data[split][1][sel].mean()) if int(sel.sum()) else None
        served = [int(d) for d in rm.modules[c].model.field_dims]  # Base's full dims where it fell back
        entry.update(
            field_dims=served,
            embedding_width=int(sum(served)),
            params=int(rm.modules[c].model.num_parameters()),
            **_cluster_guard(rm, c),
        )
        out.append(entry)
    return out


def _cluster_guard(rm, c: int) -> dict[str, Any]:
    """Cluster ``c``'s retrain guard (its ``metrics.json``): fallback (``base`` or None) and the bounds."""
    p = rm.retrain_dir / f"cluster_{c}" / "metrics.json"
    g = (read_json(p).get("guard") if p.is_file() else None) or {}
    return {"fallback": getattr(rm.modules[c], "fallback", None),
            "guard": {k: g.get(k) for k in ("admissible", "excess_upper", "auc_lower", "reason", "skipped")}
            if g else None}  # fmt: skip


def retrain_guard_summary(rm) -> dict[str, Any] | None:
    """The retrain guard of the run (``retrain/retrain.json``; a run dir from before it: mode none) and
    the clusters whose model is Base's (the checkpoints' ``fallback``); None without a retrain."""
    if rm.retrain_dir is None:
        return None
    p = rm.retrain_dir / "retrain.json"
    g = (read_json(p).get("guard") if p.is_file() else None) or {"mode": "none"}
    fell = [c for c, m in enumerate(rm.modules) if getattr(m, "fallback", None) == "base"]
    return {"mode": g.get("mode", "none"), "skipped": g.get("skipped"), "clusters": rm.k,
            "fallbacks": len(fell), "fallback_clusters": fell}  # fmt: skip


def _routed_results(results, rm, scored, data, timing, fast_routing, het):
    """The routed model's part of results.json: per-cluster rows, the routing's agreement with the
    cluster stage, the fast routing, the heterogeneity and the case study (returned, or None)."""
    if fast_routing is not None:
        results["fast_routing"] = fast_routing
    if rm.routed is None:
        return None
    clusters = scored["clusters"]
    results["per_cluster"] = per_cluster = _per_cluster(rm, scored, data)
    agree = None
    stage_assign = torch.from_numpy(np.asarray(rm.ainfo["assign_test"]).astype(np.int64))
    if len(stage_assign) == len(data["test"][1]):
        agree = float((clusters["test"] == stage_assign).float().mean())
    results.update(
        cluster_input=rm.routed.input,
        routing_params=int(rm.routed.routing_parameters()),
        cluster_params=[p["params"] for p in per_cluster],
        routing_agrees_with_cluster_stage=agree,
    )
    results["timing_ms"].update(ihas=timing[rm.final], ihas_models_only=timing["routed_models_only"])
    case = case_study([m.model for m in rm.modules], data["test"][0], data["test"][1], clusters["test"])
    results["case_study"] = case
    if het is not None:
        results["heterogeneity"] = het
    return case


def _method_extras(cfg: DictConfig, rm, results: dict[str, Any]) -> None:
    """The retrain guard's fallbacks, PEP's retrained budget, the planted recovery and the Bayes AUC
    (synthetic data)."""
    ainfo, final = rm.ainfo, rm.final
    guard = retrain_guard_summary(rm)
    if guard is not None:
        results["retrain_guard"] = guard
        if guard["fallbacks"]:
            log.info("evaluate: %d of %d retrained cluster models fell back to Base (retrain guard)",
                     guard["fallbacks"], guard["clusters"])  # fmt: skip
    scores = (ainfo or {}).get("scores") or {}
    if "budget" in scores and "requested" in scores:  # PEP: the budget whose mask was retrained
        results["retrained_budget"] = {"seed": int(cfg.seed), "budget": scores["budget"],
                                       "requested": scores["requested"], "fallback": bool(scores.get("fallback")),
                                       "reached": scores.get("reached")}  # fmt: skip
        if scores.get("fallback"):
            msg = (f"{final} retrained the sparsest budget reached, {scores['budget']:g}, not the configured "
                   f"{scores['requested']:g} (the search never reached it; reached: {scores.get('reached')})")  # fmt: skip
            log.warning("evaluate: %s", msg)
            results["warnings"].append(msg)
    if ainfo is not None and "recovery" in ainfo:
        results["recovery"] = ainfo["recovery"]
    if ainfo is not None and "truth" in ainfo:
        results["derived_vs_truth"] = ainfo["truth"]
    truth = rm.prepared / "truth.json"
    if truth.is_file():
        results["bayes_test_auc"] = read_json(truth).get("bayes_test_auc")


def _write_outputs(cfg: DictConfig, rm, results, scored, data, case):
    """evaluate/: results.json, test_scores.npz, results.md, Figure 6, the manifest (last)."""
    from ..report.tables import print_results, results_markdown

    out = output_dir(cfg) / EVALUATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    final_logits = scored["logits"]["test"].get(rm.final)
    if final_logits is not None:
        np.savez_compressed(out / "test_scores.npz", y=data["test"][1].numpy().astype(np.int8),
                            logits=final_logits.numpy().astype(np.float32), row=np.array(rm.final))  # fmt: skip
    (out / "results.md").write_text(results_markdown(results))
    if case is not None:
        from ..report.figures import case_study_png

        case_study_png(case, out / "figure6_case_study.png",
                       f"Figure 6: each cluster's model on every cluster's test samples ({cfg.dataset.name})")  # fmt: skip
    parents: dict[str, Any] = {"search_ckpt": rm.search_ckpt}
    if rm.retrain_dir is not None:
        parents.update(retrain_dir=rm.retrain_dir, arch_dir=rm.arch_dir)
    if rm.base_ckpt is not None:
        parents["base_ckpt"] = rm.base_ckpt
    write_manifest(out, make_manifest("evaluate", cfg, CONFIG_KEYS, parents=parents))
    print_results(results)
    return out


def _log_results(cfg: DictConfig, logger, results, case, out, metrics) -> None:
    """The flat metrics, the results table, Figure 6 and the recovery table to the (W&B) logger."""
    from ..loggers import build_logger, finish_loggers, log_table
    from ..report.tables import RESULT_COLUMNS, result_rows

    own = logger is None
    if own:
        logger = build_logger(cfg, f"{cfg.tag}")
    try:
        if logger is not None:
            logger.log_metrics({k_: float(v) for k_, v in metrics.items() if v is not None})
            log_table(logger, "evaluate/results", RESULT_COLUMNS, result_rows(results))
            if case is not None:
                from ..loggers import log_image

                log_image(logger, "evaluate/figure6_case_study", out / "figure6_case_study.png")
            if "recovery" in results:
                from ..report.tables import RECOVERY_COLUMNS, recovery_rows

                log_table(logger, "evaluate/recovery", RECOVERY_COLUMNS, recovery_rows(results["recovery"]))
    finally:
        if own:
            finish_loggers()


#: fewer rows routed differently than this (but some) leave the fast routing's target undecided
MIN_REROUTED = 30


def fast_routing_target(ci: list[float | None], rerouted: int | None = None) -> str:
    """The fast path's serving target, AUC within 0.001 (``SIGNIFICANT``) of the exact routing,
    judged on a 95% interval of the difference: ``met`` when fast - exact >= -0.001 over the whole
    interval, ``not met`` when it is below -0.001 over the whole interval, ``undecided`` when the split
    is too small to tell (the interval spans -0.001), ``n/a`` without an interval.

    Only the ``rerouted`` rows (routed differently by the two) make the scorings differ, so the
    interval's width is estimated from them alone; with a handful (1 to ``MIN_REROUTED - 1``) it is
    itself noise, and the verdict is ``undecided`` whatever the interval says. Measured on the Criteo
    sample: 8 rerouted validation rows gave [-0.0003, +0.0059] ("met"), and the test split then lost
    0.0143."""
    lo, hi = ci
    if lo is None or hi is None:
        return "n/a"
    if rerouted is not None and 0 < rerouted < MIN_REROUTED:
        return "undecided"
    if lo >= -SIGNIFICANT:
        return "met"
    return "not met" if hi < -SIGNIFICANT else "undecided"


def fast_routing_report(
    fast: dict[str, Any],
    exact: dict[str, Any],
    agreement: dict[str, float | None],
    differences: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], str | None]:
    """The fast routing's report (agreement with the exact clusters and AUC difference, per split) and
    the warning to serve the exact routing, decided on validation: which routing to serve is a choice,
    and choices are made on validation (the test difference is reported beside it).

    ``differences``: per split, :func:`~ihas_lightning.stats.paired_auc_difference` of the fast and
    exact logits (DeLong's 95% interval of fast - exact): reported with the target's verdict
    (:func:`fast_routing_target`), so a few hundred rows, where a handful of rerouted rows moves the
    AUC by several thousandths, read as ``undecided`` rather than as a cost or a gain."""
    differences = differences or {}
    report: dict[str, Any] = {}
    for split in ("val", "test"):
        fa, ea = fast[f"{split}_auc"], exact[f"{split}_auc"]
        report[f"agreement_{split}"] = agreement.get(split)
        report[f"{split}_auc_minus_exact"] = None if fa is None or ea is None else fa - ea
        diff = differences.get(split) or {}
        ci = diff.get("ci", [None, None])
        report[f"{split}_auc_minus_exact_ci95"] = ci
        report[f"{split}_rerouted_rows"] = diff.get("rerouted")
        report[f"{split}_within_{SIGNIFICANT}"] = fast_routing_target(ci, diff.get("rerouted"))
    report.update(inference_ms=fast["inference_ms"], exact_inference_ms=exact["inference_ms"])
    d, dt = report["val_auc_minus_exact"], report["test_auc_minus_exact"]
    if d is None or d >= -SIGNIFICANT:
        return report, None
    lo, hi = report["val_auc_minus_exact_ci95"]
    interval = "" if lo is None else f", 95% CI [{lo:+.4f}, {hi:+.4f}]"
    return report, (f"fast routing costs {-d:.4f} validation AUC against the exact routing (> {SIGNIFICANT}"
                    f"{interval}{'' if dt is None else f'; test {dt:+.4f}'}): serve with routing=exact")  # fmt: skip


def case_study(
    models: list[Any], xs: list[torch.Tensor], y: torch.Tensor, clusters: torch.Tensor
) -> dict[str, Any]:
    """Paper Figure 6 as a matrix: model i (rows) on the test samples routed to cluster j (columns),
    AUC and logloss; per column, the own model's advantage over the mean of the other models (the
    paper's claim: a sample does better in its own cluster's model)."""
    k = len(models)
    auc = [[None] * k for _ in range(k)]
    ll = [[None] * k for _ in range(k)]
    samples = [int((clusters == j).sum()) for j in range(k)]
    for i, m in enumerate(models):
        lg = predict(lambda x, m=m: m(x, "open"), xs)
        for j in range(k):
            sel = clusters == j
            auc[i][j], ll[i][j] = auc_logloss(lg[sel], y[sel])
    own: list[dict[str, Any]] = []
    for j in range(k):
        others = [i for i in range(k) if i != j]
        entry: dict[str, Any] = {"cluster": j, "samples": samples[j]}
        for key, mat in (("auc", auc), ("logloss", ll)):
            vals = [mat[i][j] for i in others if mat[i][j] is not None]
            entry[f"own_{key}"] = mat[j][j]
            entry[f"others_mean_{key}"] = sum(vals) / len(vals) if vals else None
            entry[f"own_minus_others_{key}"] = (
                mat[j][j] - entry[f"others_mean_{key}"] if vals and mat[j][j] is not None else None
            )
        entry["own_is_best_auc"] = all(
            auc[j][j] is not None and (auc[i][j] is None or auc[j][j] >= auc[i][j]) for i in others
        )
        entry["own_is_best_logloss"] = all(
            ll[j][j] is not None and (ll[i][j] is None or ll[j][j] <= ll[i][j]) for i in others
        )
        own.append(entry)
    return {"auc": auc, "logloss": ll, "samples": samples, "per_cluster": own,
            "note": "rows: the cluster whose model predicts; columns: the cluster whose test samples are scored"}  # fmt: skip


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
    """Scalar metrics for loggers / the sweeper: ``final/test/auc``, ``base/val/auc`` etc. (iHAS also
    ``routed/...`` and ``ihas1/...``)."""
    names = results.get("row_keys") or {
        "Base": "base",
        "iHAS-1": "ihas1",
        "iHAS": "routed",
        "Constant": "constant",
    }
    m: dict[str, Any] = {}
    final = results.get("final_row")
    for r in results["rows"]:
        prefixes = [names.get(r["model"], r["model"])]
        if r["model"] == final and "final" not in prefixes:
            prefixes.append("final")
        for p in prefixes:
            for split in ("val", "test"):
                m[f"{p}/{split}/auc"] = r.get(f"{split}_auc")
                m[f"{p}/{split}/logloss"] = r.get(f"{split}_logloss")
            m[f"{p}/params"] = r["params"]
            m[f"{p}/inference_ms"] = r["inference_ms"]
    if results.get("retrain_guard"):
        m["retrain_guard/fallbacks"] = results["retrain_guard"]["fallbacks"]
    if "routing_params" in results:
        m["routed/routing_params"] = results["routing_params"]
        m["routed/models_only_ms"] = results["timing_ms"]["routed_models_only"]
    for c in results.get("per_cluster", []):
        for split in ("val", "test"):
            m[f"routed/cluster_{c['cluster']}/{split}/auc"] = c[f"{split}_auc"]
            m[f"routed/cluster_{c['cluster']}/{split}_samples"] = c[f"{split}_samples"]
    het = results.get("heterogeneity")
    if het:
        for key in ("statistic", "null_mean", "null_q95", "p_value", "trained_statistic", "soft_statistic",
                    "soft_null_mean", "soft_p_value"):  # fmt: skip
            m[f"heterogeneity/{key}"] = het.get(key)
    for r in results["rows"]:
        if r.get("inference_exact_ms") is not None:
            m[f"{names.get(r['model'], r['model'])}/inference_exact_ms"] = r["inference_exact_ms"]
    if "recovery" in results:
        for r in results["recovery"]["per_cluster"]:
            m[f"recovery/cluster_{r['cluster']}/f1"] = r["f1"]
        m["recovery/min_f1"] = results["recovery"]["min_f1"]
    if "derived_vs_truth" in results:
        m["derive/truth_f1"] = results["derived_vs_truth"]["f1"]
    return m


def served_routing(fast_routing: dict[str, Any] | None, routes: bool) -> tuple[str | None, str]:
    """(the routing ``routing=auto`` serves, why): the rule of
    :func:`ihas_lightning.serving.choose_routing` applied to this evaluation's verdict (fast where the
    fast routing is judged within 0.001 AUC of the exact on validation, else exact); None for a model
    that does not route."""
    if not routes:
        return None, "the model does not route"
    if fast_routing is None:
        return "exact", "the run has no distilled router"
    verdict = fast_routing.get(f"val_within_{SIGNIFICANT}")
    if verdict == "met":
        return "fast", f"fast routing within {SIGNIFICANT} AUC of the exact on validation"
    return "exact", f"fast routing within {SIGNIFICANT} AUC of the exact on validation: {verdict}"


def heterogeneity_report(
    masks: torch.Tensor,
    assign: torch.Tensor,
    ainfo: dict[str, Any],
    k: int,
    keep_threshold: float,
    permutations: int,
    seed: int,
) -> dict[str, Any]:
    """The permutation test of the clusters' architectures (:func:`~ihas_lightning.stats.heterogeneity_test`)
    on the validation rows' gate masks and exact-routing clusters, plus the statistic of the
    architectures actually retrained (``trained_statistic``, from the cluster stage's train masks)."""
    from ..stats import dims_difference

    f = len(ainfo["field_dims"][0])
    d = int(ainfo["embed_dim"])
    res = heterogeneity_test(masks.float(), assign, k, f, d, keep_threshold, permutations, seed)
    trained = [[int(v) for v in row] for row in ainfo["field_dims"]]
    res.update(
        trained_statistic=float(dims_difference(torch.tensor(trained))),
        trained_field_dims=trained,
        split="val",
        keep_threshold=keep_threshold,
        what=("mean over fields of |kept dims of cluster a - of cluster b|, averaged over cluster pairs; "
              "null: validation rows' cluster assignments permuted, architectures re-derived by the "
              "majority rule (retrain.keep_threshold on each cluster's mean mask)"),
    )  # fmt: skip
    return res
