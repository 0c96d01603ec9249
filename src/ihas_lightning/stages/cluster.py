"""Clustering stage of iHAS (paper section 3.5.2 "Clustering Stage" and 3.4 "Clusters").

The searched embedding layer + Bernoulli gate (deterministic mode: automatic threshold searcher)
turn each TRAIN sample into its masked embedding ``E_i * m_i`` (``cluster.input``: or its 0/1 mask,
or its gate probabilities; see :func:`ihas_lightning.routing.cluster_features`). A mini-batch K-Means
(``sklearn.cluster.MiniBatchKMeans.partial_fit``) is fitted on those vectors, streamed in file
order in batches of ``cluster.batch_size`` for at most ``cluster.max_passes`` passes (seeded by ``seed``;
a pass that moves the centroids by at most ``cluster.tol`` ends the fit).

Then, with our own vectorised nearest-centroid code (:func:`ihas_lightning.routing.nearest_centroid`,
the same used at inference), every train/val/test sample is assigned, and per cluster the masks
are averaged: the retraining stage's **majority rule** keeps a dimension when its mean mask in the
cluster is ``>= retrain.keep_threshold`` (0.5); a field's size is the number of kept dims, 0 drops
the field.

Edge cases (logged, and recorded in ``cluster.json``):

* **small clusters** -- a cluster with fewer than ``cluster.min_cluster_size`` train samples (an
  empty one always) is merged: its centroid is removed, so its samples go to their nearest
  remaining centroid (for k=2: the other cluster). The smallest offender is merged first and the
  assignment recomputed, until every cluster is big enough or one is left.
* **all dims closed** -- when no dimension of a cluster reaches the threshold, the fallback keeps
  the ``model.embed_dim`` dimensions with the highest mean mask in that cluster (ties: lower index),
  i.e. one field's worth of the most-often-open dims, so the cluster still gets a real model.

Outputs in ``<output_dir>/cluster/``: ``centroids.pt`` (a dict of tensors: centroids [K, D],
mean_mask [K, D], sizes [K]), ``assign_{train,val,test}.npy`` (int32, file order), ``cluster.json``
(sizes, per-field dims and kept dim indices per cluster, merges, fallbacks, recovery on synthetic
data), ``dims_heatmap.png`` (paper Figure 5) and ``manifest.json``.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from .. import method
from ..artifacts import is_current, make_manifest, write_manifest
from ..data.feature_map import FeatureMap
from ..errors import ConfigError, DataError
from ..models import DLRM
from ..modules.router import ROUTER_FEATURES
from ..routing import CLUSTER_INPUTS, cluster_features, nearest_centroid
from ..rundir import (
    CLUSTER_DIR,
    ROUTER,
    iter_split,
    load_cluster_dir,
    load_search,
    make_datamodule,
    output_dir,
    prepared_dir,
    resolve_search_ckpt,
    stage_device,
)
from ..utils import atomic_dir, read_json, write_json

log = logging.getLogger("ihas_lightning")

CONFIG_KEYS = [
    "seed",
    "cluster.k",
    "method.cluster_k",
    "cluster.batch_size",
    "cluster.max_passes",
    "cluster.min_cluster_size",
    "cluster.input",
    "retrain.keep_threshold",
    "model.embed_dim",
    "cluster.router",
]
REQUIRED = ["cluster.json", "centroids.pt", "assign_train.npy", "assign_val.npy", "assign_test.npy"]


# ---- the clustering algorithm (pure functions, testable without files) ------------------------------
class FeatureStream:
    """The clustering features of a split's batches with the gate run once per row.

    ``batches()`` returns an iterator of x tensors (the same rows in the same batches every call). The
    first pass runs the embedding and the gate (its N*d x N*d linear layer and the threshold search)
    and keeps each row's 0/1 deterministic mask as bits (D/8 bytes a row: 78 on Criteo, 0.3 GB for 4M
    rows); every later pass rebuilds the same features from them: ``mask`` from the bits alone (no read
    of the ids), ``masked_embedding`` from one lookup of the ids' embedding times the bits. ``probs``
    (gate probabilities, not a function of the mask) runs the gate on every pass. Calling the stream
    gives an iterator of (features [B, D], mask [B, D]); :meth:`masks` of the masks alone."""

    def __init__(self, model: DLRM, batches, input: str = "masked_embedding"):
        if input not in CLUSTER_INPUTS:
            raise ValueError(f"cluster input must be one of {CLUSTER_INPUTS}, got {input!r}")
        self.model, self.batches, self.input = model, batches, input
        self.bits: list[np.ndarray] | None = None
        self.width = 0
        self.gate_rows = 0  # rows the gate ran on, all passes

    def __call__(self):
        if self.bits is None or self.input == "probs":
            return self._gate_pass()
        return self._cached_pass()

    def _gate_pass(self):
        bits: list[np.ndarray] = []
        for x in self.batches():
            feats, mask = cluster_features(self.model, x, self.input)
            self.gate_rows += len(x)
            if self.bits is None:
                bits.append(np.packbits(mask.detach().cpu().numpy() > 0, axis=1))
                self.width = int(mask.shape[1])
            yield feats, mask
        if self.bits is None:
            self.bits = bits

    def _unpack(self, b: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        m = torch.from_numpy(np.unpackbits(b, axis=1, count=self.width))
        return m.to(device=like.device, dtype=like.dtype)

    def _like(self) -> torch.Tensor:
        w = next(iter(self.model.parameters()))
        return torch.zeros((), dtype=w.dtype, device=w.device)

    @torch.no_grad()
    def masks(self):
        """The masks alone, batch by batch (from the bits once the first pass ran)."""
        if self.bits is None:
            for _, mask in self():
                yield mask
            return
        like = self._like()
        for b in self.bits:
            yield self._unpack(b, like)

    @torch.no_grad()
    def _cached_pass(self):
        assert self.bits is not None
        if self.input == "mask":
            for m in self.masks():
                yield m, m
            return
        n = 0
        for i, x in enumerate(self.batches()):
            if i >= len(self.bits) or len(self.bits[i]) != len(x):
                raise RuntimeError("cluster stage: the train batches changed between passes")
            e = self.model.embed(x)
            m = self._unpack(self.bits[i], e)
            n += 1
            yield e * m, m
        if n != len(self.bits):
            raise RuntimeError("cluster stage: the train batches changed between passes")


def _stream(model: DLRM, batches, input: str) -> FeatureStream:
    return batches if isinstance(batches, FeatureStream) else FeatureStream(model, batches, input)


def fit_kmeans(
    model: DLRM,
    batches,
    k: int,
    passes: int,
    batch_size: int,
    seed: int,
    input: str = "masked_embedding",
    tol: float = 0.0,
    info: dict[str, Any] | None = None,
) -> np.ndarray:
    """Mini-batch K-Means over the clustering features (``cluster.input``, default the masked
    embeddings) of ``batches()`` (a callable returning an iterator of x tensors, or a
    :class:`FeatureStream`), at most ``passes`` passes: the gate runs on the first. A pass that moves
    the centroids by at most ``tol`` (their squared shift over the pass, relative to their squared
    norm) ends the fit: the later passes would move them less still (each centroid's step size is one
    over the rows it has absorbed). ``info`` receives the passes run and each pass's relative shift.
    Returns the centroids [k, D] (float32)."""
    import sklearn
    from sklearn.cluster import MiniBatchKMeans

    stream = _stream(model, batches, input)
    # compute_labels=False: partial_fit's labels and inertia of each batch (a second distance pass per
    # batch) are not used; the centroids are the same
    km = MiniBatchKMeans(
        n_clusters=k, batch_size=batch_size, random_state=seed, n_init=1, compute_labels=False
    )
    buf: list[np.ndarray] = []
    buffered = 0
    shifts: list[float] = []
    info = {} if info is None else info
    with sklearn.config_context(assume_finite=True):  # the features are finite (no per-batch scan)
        for p in range(passes):
            before = km.cluster_centers_.copy() if hasattr(km, "cluster_centers_") else None
            for feats, _ in stream():
                arr = feats.cpu().numpy().astype(np.float32, copy=False)
                if not hasattr(km, "cluster_centers_"):
                    # the first partial_fit initialises with k-means++ on its batch: it needs >= k rows
                    buf.append(arr)
                    buffered += len(arr)
                    if buffered < k:
                        continue
                    arr = np.concatenate(buf)
                    buf = []
                km.partial_fit(arr)
            info["passes"] = p + 1
            if before is not None:
                c = km.cluster_centers_.astype(np.float64)
                shifts.append(
                    float(((c - before) ** 2).sum() / max((before.astype(np.float64) ** 2).sum(), 1e-30))
                )
                info["shifts"] = shifts
                if shifts[-1] <= tol:
                    break
    if not hasattr(km, "cluster_centers_"):
        raise DataError(
            f"cluster.k={k} clusters need at least {k} train samples, got {buffered // max(1, passes)}"
        )
    return km.cluster_centers_.astype(np.float32)


def _mask_sums(c: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Per-cluster sums [k, D] (float64) of 0/1 masks: one [k, B] x [B, D] product (exact: the sums are
    integers below 2^24 per batch)."""
    onehot = torch.zeros(k, len(c), dtype=mask.dtype, device=mask.device)
    onehot[c.to(mask.device), torch.arange(len(c), device=mask.device)] = 1
    return (onehot @ mask).double().cpu()


def assign_pass(
    model: DLRM, batches, centroids: torch.Tensor, with_masks: bool, input: str = "masked_embedding"
) -> dict[str, Any]:
    """One ordered pass: nearest-centroid assignment of every sample (+ per-cluster mask sums).
    ``batches``: a callable returning an iterator of x tensors, or a :class:`FeatureStream`."""
    k, dim = centroids.shape
    assign: list[np.ndarray] = []
    mask_sum = torch.zeros(k, dim, dtype=torch.float64)
    for feats, mask in _stream(model, batches, input)():
        c = nearest_centroid(feats, centroids.to(feats.device))
        assign.append(c.cpu().numpy().astype(np.int32))
        if with_masks:
            mask_sum += _mask_sums(c, mask, k)
    a = np.concatenate(assign) if assign else np.zeros(0, dtype=np.int32)
    return {"assign": a, "counts": np.bincount(a, minlength=k), "mask_sum": mask_sum}


def majority_dims(
    mean_mask: np.ndarray, num_fields: int, embed_dim: int, threshold: float
) -> tuple[list[list[int]], list[list[list[int]]], list[bool]]:
    """Majority rule per cluster: (field dims [K][F], kept dim indices [K][F][...], fallback used [K])."""
    k = mean_mask.shape[0]
    keep = mean_mask >= threshold
    fallback = []
    for c in range(k):
        if keep[c].any():
            fallback.append(False)
            continue
        top = np.argsort(-mean_mask[c], kind="stable")[:embed_dim]
        keep[c, top] = True
        fallback.append(True)
    keep3 = keep.reshape(k, num_fields, embed_dim)
    dims = keep3.sum(axis=2).astype(int).tolist()
    kept = [[np.flatnonzero(keep3[c, f]).tolist() for f in range(num_fields)] for c in range(k)]
    return dims, kept, fallback


def cluster_model(
    model: DLRM,
    train_batches,
    k: int,
    passes: int,
    batch_size: int,
    seed: int,
    min_cluster_size: int,
    keep_threshold: float,
    input: str = "masked_embedding",
    tol: float = 0.0,
) -> dict[str, Any]:
    """Fit K-Means, merge small clusters, average the masks and apply the majority rule (train only).
    The gate runs once per train row (:class:`FeatureStream`); ``seconds`` times the parts."""
    t0 = time.perf_counter()
    stream = _stream(model, train_batches, input)
    km_info: dict[str, Any] = {}
    centroids = torch.from_numpy(fit_kmeans(model, stream, k, passes, batch_size, seed, input, tol, km_info))
    t1 = time.perf_counter()
    ids = list(range(k))  # K-Means cluster id of each remaining centroid
    merges: list[dict[str, Any]] = []
    min_size = max(1, int(min_cluster_size))
    while True:
        res = assign_pass(model, stream, centroids, with_masks=True, input=input)
        counts = res["counts"]
        small = [j for j in range(len(ids)) if counts[j] < min_size]
        if not small or len(ids) == 1:
            break
        j = min(small, key=lambda i: (counts[i], i))
        others = [i for i in range(len(ids)) if i != j]
        d = ((centroids[others] - centroids[j]) ** 2).sum(1)
        nearest = others[int(d.argmin())]
        msg = (
            f"cluster stage: K-Means cluster {ids[j]} has {int(counts[j])} train samples "
            f"(< cluster.min_cluster_size={min_size}); merged: its centroid is removed and its samples "
            f"go to their nearest remaining centroid (nearest cluster: {ids[nearest]})"
        )
        log.warning(msg)
        merges.append({"kmeans_cluster": ids[j], "train_samples": int(counts[j]), "nearest": ids[nearest]})
        keep = [i for i in range(len(ids)) if i != j]
        centroids = centroids[keep].contiguous()
        ids = [ids[i] for i in keep]
    seconds = {"kmeans": round(t1 - t0, 3), "assign_train": round(time.perf_counter() - t1, 3)}
    counts = res["counts"]
    mean_mask = (res["mask_sum"] / torch.from_numpy(np.maximum(counts, 1)).double().unsqueeze(1)).numpy()
    f, d = model.num_fields, model.embed_dim
    dims, kept, fallback = majority_dims(mean_mask, f, d, keep_threshold)
    for c, fb in enumerate(fallback):
        if fb:
            msg = (
                f"cluster stage: every dimension of cluster {c} is closed by the majority rule "
                f"(no mean mask >= retrain.keep_threshold={keep_threshold}); fallback: keeping its "
                f"{d} highest-mean-mask dims -> field dims {dims[c]}"
            )
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)
    return {
        "centroids": centroids.float(),
        "kmeans_ids": ids,
        "merges": merges,
        "train_assign": res["assign"],
        "train_counts": counts,
        "mean_mask": mean_mask,
        "field_dims": dims,
        "kept_dims": kept,
        "fallback": fallback,
        "gate_rows": stream.gate_rows,
        "seconds": seconds,
        "kmeans": {
            "passes": km_info.get("passes"),
            "max_passes": passes,
            "tol": tol,
            "relative_shifts": km_info.get("shifts", []),
        },  # fmt: skip
    }


# ---- recovery of the planted fields (synthetic data) ------------------------------------------------
def _prf(selected: set[str], relevant: set[str]) -> dict[str, float]:
    tp = len(selected & relevant)
    p = tp / len(selected) if selected else 0.0
    r = tp / len(relevant) if relevant else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f1}


def planted_recovery(
    field_dims: list[list[int]],
    field_names: list[str],
    train_assign: np.ndarray,
    train_group: np.ndarray,
    truth: dict,
) -> dict[str, Any]:
    """Precision/recall/F1 of each cluster's selected fields (size > 0 in its retrained model) vs the
    planted relevant fields of the cluster's majority latent group (by ``_group`` of its train
    samples), and per true group via the cluster that holds most of that group's train samples. The
    key field is left out of the scoring (as in :func:`ihas_lightning.report.recovery.field_recovery`)."""
    groups = {int(g): set(v) for g, v in truth["groups"].items()}
    k = len(field_dims)
    ng = max(groups) + 1
    table = np.zeros((k, ng), dtype=np.int64)  # cluster x group sample counts
    np.add.at(table, (train_assign.astype(np.int64), train_group.astype(np.int64)), 1)
    key = truth.get("key_field")
    # the key field identifies the group and drives no label: reported (key_dims) but not scored
    sel = [{field_names[f] for f, dd in enumerate(field_dims[c]) if dd > 0} - {key} for c in range(k)]
    key_dims = [int(field_dims[c][field_names.index(key)]) if key in field_names else None for c in range(k)]
    per_cluster = []
    for c in range(k):
        g = int(table[c].argmax())
        n = int(table[c].sum())
        per_cluster.append(
            {
                "cluster": c,
                "group": g,
                "purity": float(table[c, g] / n) if n else 0.0,
                "selected": sorted(sel[c]),
                "relevant": sorted(groups[g]),
                "key_dims": key_dims[c],
                **_prf(sel[c], groups[g]),
            }
        )
    per_group = []
    for g in sorted(groups):
        c = int(table[:, g].argmax())
        n = int(table[:, g].sum())
        per_group.append(
            {
                "group": g,
                "cluster": c,
                "share_in_cluster": float(table[c, g] / n) if n else 0.0,
                "selected": sorted(sel[c]),
                "relevant": sorted(groups[g]),
                **_prf(sel[c], groups[g]),
            }
        )
    return {
        "contingency": table.tolist(),
        "per_cluster": per_cluster,
        "per_group": per_group,
        "min_f1": min(x["f1"] for x in per_cluster),
    }


# ---- the stage ---------------------------------------------------------------------------------------
def check_cfg(cfg: DictConfig) -> None:
    k = cfg.method.get("cluster_k")
    key, k = ("method.cluster_k", k) if k is not None else ("cluster.k", cfg.cluster.k)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"config key '{key}': must be an integer >= 1 (got {k!r})")
    if int(cfg.cluster.batch_size) < 1:
        raise ConfigError(f"config key 'cluster.batch_size': must be >= 1 (got {cfg.cluster.batch_size})")
    if int(cfg.cluster.max_passes) < 1:
        raise ConfigError(f"config key 'cluster.max_passes': must be >= 1 (got {cfg.cluster.max_passes})")
    tol = cfg.cluster.get("tol")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or tol < 0:
        raise ConfigError(f"config key 'cluster.tol': must be a number >= 0 (got {tol!r})")
    if cfg.cluster.input not in CLUSTER_INPUTS:
        raise ConfigError(
            f"config key 'cluster.input': must be one of {list(CLUSTER_INPUTS)} (got {cfg.cluster.input!r})"
        )
    rc = cfg.cluster.router
    for key in ("max_rows", "epochs", "batch_size", "min_steps"):
        if int(rc[key]) < 1:
            raise ConfigError(f"config key 'cluster.router.{key}': must be >= 1 (got {rc[key]})")
    if rc.features not in ROUTER_FEATURES:
        raise ConfigError(
            f"config key 'cluster.router.features': must be one of {list(ROUTER_FEATURES)} (got {rc.features!r})"
        )
    if not float(rc.lr) > 0:
        raise ConfigError(f"config key 'cluster.router.lr': must be > 0 (got {rc.lr})")
    router_weight_decays(rc)
    thr = float(cfg.retrain.keep_threshold)
    if not 0.0 < thr <= 1.0:
        raise ConfigError(f"config key 'retrain.keep_threshold': must be in (0, 1] (got {thr})")


def run(cfg: DictConfig, logger: Any = None) -> dict[str, Any]:
    """stage=cluster. ``logger``: a Lightning logger of the calling pipeline (else one is built)."""
    check_cfg(cfg)
    out = output_dir(cfg) / CLUSTER_DIR
    ckpt = resolve_search_ckpt(cfg)
    prepared = prepared_dir(cfg)
    fmap = FeatureMap.load(prepared)
    dev = stage_device(cfg)  # the trainer's accelerator (trainer=gpu: the masked embeddings on the GPU)
    model = load_search(ckpt, fmap).to(dev)
    parents = {"search_ckpt": ckpt, "feature_map": prepared / "feature_map.json"}
    manifest = make_manifest("cluster", cfg, CONFIG_KEYS, parents=parents)
    if is_current(out, manifest, REQUIRED):
        log.info("cluster stage: %s is up to date (same config hash and inputs); reusing it", out)
        return _metrics(read_json(out / "cluster.json"))

    t0 = time.perf_counter()
    # the gate folded into the id table: the same deterministic masks in 1/d of the gate's work
    fold = model.fold_gate()
    log.info("cluster stage: the search model's gate %s", fold)
    dm = make_datamodule(cfg, prepared, batch_size=int(cfg.cluster.batch_size))
    # the router's rows (a seeded subset of each split) are taken from the clustering's own reads
    rc = cfg.cluster.router
    samples = (
        {s: RowSample(dm.num_rows(s), int(rc.max_rows), int(cfg.seed)) for s in ("train", "val", "test")}
        if bool(rc.enabled) and method.cluster_k(cfg) > 1
        else {}
    )
    res, assigns, seconds = _cluster_and_assign(cfg, model, dm, dev, samples)
    k = res["centroids"].shape[0]
    info = _info(cfg, res, assigns, fmap, model, ckpt, prepared)
    info["gate_fold"] = fold
    if (prepared / "truth.json").is_file():
        truth = read_json(prepared / "truth.json")
        group = np.asarray(dm.extra_column("train", "_group"))
        info["recovery"] = planted_recovery(
            res["field_dims"], fmap.field_names, assigns["train"], group, truth
        )
    router = None
    if bool(rc.enabled) and k > 1:
        router, info["router"] = train_router(cfg, dm, fmap, assigns, out, model, samples=samples)
        seconds["router"] = info["router"]["seconds"]
    info["seconds"] = round(time.perf_counter() - t0, 3)  # up to the writes (the seconds of the parts below)
    info["seconds_by_part"] = seconds
    info["gate_rows"] = {
        "train": int(res["gate_rows"]),
        "val": len(assigns["val"]),
        "test": len(assigns["test"]),
    }
    _write(out, manifest, info, res, assigns, router, fmap, seconds)
    log.info(
        "cluster stage: k=%d sizes(train)=%s field dims=%s -> %s",
        k,
        info["sizes"]["train"],
        res["field_dims"],
        out,
    )
    metrics = _metrics(info)
    _log(cfg, logger, metrics, out)
    return metrics


def _cluster_and_assign(cfg: DictConfig, model, dm, dev, samples: dict):
    """Mini-batch K-Means on the train split's (masked) embeddings, then every val / test row assigned
    to its nearest centroid; each pass feeds the router's row samples: (result, assignments, seconds)."""
    bs = int(cfg.cluster.batch_size)

    def batches(split: str):
        sample = samples.get(split)

        def it():
            for x, _ in iter_split(dm, split, bs):
                if sample is not None:
                    sample.add(x)
                yield x.to(dev, non_blocking=True)

        return it

    cinput = str(cfg.cluster.input)
    torch.manual_seed(int(cfg.seed))
    with torch.no_grad():
        res = cluster_model(
            model,
            batches("train"),
            k=method.cluster_k(cfg),
            passes=int(cfg.cluster.max_passes),
            batch_size=bs,
            seed=int(cfg.seed),
            min_cluster_size=int(cfg.cluster.min_cluster_size),
            keep_threshold=float(cfg.retrain.keep_threshold),
            input=cinput,
            tol=float(cfg.cluster.tol),
        )
        assigns = {"train": res["train_assign"]}
        t1 = time.perf_counter()
        for split in ("val", "test"):
            passed = assign_pass(model, batches(split), res["centroids"], with_masks=False, input=cinput)
            assigns[split] = passed["assign"]
        seconds = {**res["seconds"], "assign_val_test": round(time.perf_counter() - t1, 3)}
    return res, assigns, seconds


def _info(cfg: DictConfig, res, assigns, fmap, model, ckpt: Path, prepared: Path) -> dict[str, Any]:
    """cluster.json: the clusters (k, sizes, merges), each one's kept dims per field, the inputs."""
    k = res["centroids"].shape[0]
    return {
        "k_requested": method.cluster_k(cfg),
        "input": str(cfg.cluster.input),
        "k": int(k),
        "kmeans_ids": res["kmeans_ids"],
        "kmeans": res["kmeans"],
        "merges": res["merges"],
        "sizes": {s: np.bincount(a, minlength=k).astype(int).tolist() for s, a in assigns.items()},
        "field_names": fmap.field_names,
        "vocab_sizes": fmap.vocab_sizes,
        "embed_dim": model.embed_dim,
        "keep_threshold": float(cfg.retrain.keep_threshold),
        "field_dims": res["field_dims"],
        "kept_dims": res["kept_dims"],
        "fallback": res["fallback"],
        "mean_mask_per_field": res["mean_mask"]
        .reshape(k, model.num_fields, model.embed_dim)
        .mean(2)
        .tolist(),
        "search_ckpt": str(ckpt.resolve()),
        "prepared_dir": str(prepared.resolve()),
        "seconds": None,
    }


def _write(out: Path, manifest, info, res, assigns, router, fmap, seconds: dict) -> None:
    """cluster/ written atomically: the router, the centroids, the assignments, the dims heatmap,
    cluster.json and (last) the manifest."""
    from ..report.heatmap import dims_heatmap

    k, sizes = info["k"], info["sizes"]
    t_write = time.perf_counter()
    with atomic_dir(out, overwrite=True) as tmp:
        if router is not None:
            torch.save({"state_dict": router.state_dict(), "vocab_sizes": fmap.vocab_sizes, "k": int(k)},
                       tmp / ROUTER)  # fmt: skip
        torch.save(
            {
                "centroids": res["centroids"].contiguous(),
                "mean_mask": torch.from_numpy(res["mean_mask"]).float(),
                "sizes": torch.tensor(sizes["train"], dtype=torch.long),
            },
            tmp / "centroids.pt",
        )
        for s, a in assigns.items():
            np.save(tmp / f"assign_{s}.npy", a.astype(np.int32))
        dims_heatmap(res["field_dims"], fmap.field_names, tmp / "dims_heatmap.png", sizes=sizes["train"])
        seconds["write"] = round(time.perf_counter() - t_write, 3)  # the tensors, assignments and figure
        write_json(tmp / "cluster.json", info)
        write_manifest(tmp, manifest)


class RowSample:
    """A seeded random subset of at most ``max_rows`` of a split's ``n`` rows (the router's rows),
    gathered from the batches of one ordered pass as they go by (:meth:`add`; later passes are
    ignored): the same rows :func:`_rows_of` reads."""

    def __init__(self, n: int, max_rows: int, seed: int):
        self.keep = _keep_mask(n, max_rows, seed)
        self.pos = 0
        self.bad = False  # a pass longer than the split (then :func:`_rows_of` reads the rows)
        self.xs: list[torch.Tensor] = []

    @property
    def complete(self) -> bool:
        return not self.bad and self.pos == len(self.keep)

    def add(self, x: torch.Tensor) -> None:
        if self.bad or self.pos == len(self.keep):
            return  # a later pass
        hi = self.pos + len(x)
        if hi > len(self.keep):
            self.bad = True
            return
        m = self.keep[self.pos : hi]
        if m.any():
            self.xs.append(x[torch.from_numpy(m)])  # a copy (the loader may reuse its buffers)
        self.pos = hi

    def rows(self, assign: np.ndarray, fields: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.complete or len(assign) != len(self.keep):
            raise RuntimeError("the row sample saw no whole pass of its split")
        x = torch.cat(self.xs) if self.xs else torch.zeros(0, fields, dtype=torch.long)
        return x.long(), torch.from_numpy(assign[self.keep].astype(np.int64))


def _keep_mask(n: int, max_rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 0x2007]).random(n) < min(1.0, max_rows / max(n, 1))


def _rows_of(dm: Any, split: str, assign: np.ndarray, max_rows: int, seed: int, bs: int, fields: int):
    """(x [n, F], exact cluster [n]) of a seeded random subset of at most ``max_rows`` rows of
    ``split``, read in one streaming pass (memory: the subset only)."""
    n = len(assign)
    keep = _keep_mask(n, max_rows, seed)
    xs, pos = [], 0
    for x, _ in iter_split(dm, split, bs):
        m = torch.from_numpy(keep[pos : pos + len(x)])
        xs.append(x[m])
        pos += len(x)
    x = torch.cat(xs) if xs else torch.zeros(0, fields, dtype=torch.long)
    return x.long(), torch.from_numpy(assign[keep].astype(np.int64))


def router_weight_decays(rc: Any) -> list[float]:
    """``cluster.router.weight_decay``: one value or a list (each >= 0) to choose from on validation."""
    from omegaconf import ListConfig

    wd = rc.get("weight_decay", 0.0)
    values = list(wd) if isinstance(wd, (list, tuple, ListConfig)) else [wd]
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        out = []
    if not out or any(not v >= 0 for v in out):
        raise ConfigError(
            f"config key 'cluster.router.weight_decay': must be a number >= 0 or a non-empty list of them (got {wd!r})"
        )
    return out


class _IndexedBatches:
    """Re-iterable batches ``(t[idx] for t in tensors)`` of ``batch_size`` rows in ``order``'s order (a
    sampler, drawn anew each pass): the batches of ``DataLoader(BatchSampler(order, batch_size))``, each
    taken with one index tensor."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], order: Any, batch_size: int):
        self.tensors, self.order, self.batch_size = tensors, order, int(batch_size)

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self):
        idx = sampler_order(self.order)
        for i in range(0, len(idx), self.batch_size):
            j = idx[i : i + self.batch_size]
            yield tuple(t.index_select(0, j) for t in self.tensors)  # ~3x the speed of t[j] on CPU


def sampler_order(order: Any) -> torch.Tensor:
    """The indices ``order`` yields, as one int64 tensor. A seeded ``RandomSampler`` without
    replacement is drawn as its ``__iter__`` draws them (whole ``randperm``s from its generator, the
    last one cut), without a Python int per row; anything else is listed."""
    from torch.utils.data import RandomSampler

    if isinstance(order, RandomSampler) and not order.replacement and order.generator is not None:
        n, m, g = len(order.data_source), order.num_samples, order.generator
        parts = [torch.randperm(n, generator=g) for _ in range(m // n)]
        parts.append(torch.randperm(n, generator=g)[: m % n])
        return torch.cat(parts)
    return torch.as_tensor(list(order), dtype=torch.long)


def train_router(
    cfg: DictConfig,
    dm: Any,
    fmap: FeatureMap,
    assigns: dict[str, np.ndarray],
    out: Path,
    model: Any,
    samples: dict[str, RowSample] | None = None,
):
    """The distilled router (:class:`~ihas_lightning.models.router.LinearRouter`): fitted on at most
    ``cluster.router.max_rows`` train rows and their exact clusters, on the searched ``model``'s
    embedding (``cluster.router.features=embedding``, folded into the id table) or on the ids;
    returns (router, its report with the agreement with the exact assignment on each split's subset).

    ``samples``: each split's rows, gathered by the clustering's passes (:class:`RowSample`); a split
    without a complete one is read again (:func:`_rows_of`). Every value of ``weight_decay`` is fitted
    in one fit (one classifier per value on the same batches, :class:`RouterModule`), with no
    validation pass per epoch: the agreements are measured once, on the folded routers."""
    from torch.utils.data import RandomSampler, TensorDataset

    from ..modules.router import RouterModule, embedding_stats
    from ..training import build_trainer

    rc = cfg.cluster.router
    t0 = time.perf_counter()
    k = int(max(a.max() for a in assigns.values() if len(a))) + 1
    bs, seed = int(cfg.cluster.batch_size), int(cfg.seed)
    data = _router_rows(cfg, dm, fmap, assigns, samples or {})
    torch.manual_seed(seed)
    features = str(rc.features)
    extra: dict[str, Any] = {}
    if features == "embedding":
        mean, std = embedding_stats(model.embedding, data["train"][0], bs)
        extra = {"embedding": model.embedding, "mean": mean, "std": std}
    decays = router_weight_decays(rc) if features == "embedding" else [0.0]  # ids: SparseAdam, no decay
    if not len(data["val"][1]):
        decays = decays[:1]  # nothing to choose on: the first value
    rows, epochs, rbs = len(data["train"][1]), int(rc.epochs), int(rc.batch_size)
    # an epoch is one pass over the rows, or more passes (whole reshuffles) where a small train split
    # would give fewer than min_steps steps in all (without a Lightning epoch per few batches)
    per_epoch = max(rows, -(-int(rc.min_steps) // epochs) * rbs)
    train_set = TensorDataset(*data["train"])
    # one fit for every weight decay (one classifier each, the same seed and batches); the best
    # validation agreement wins, a tie goes to the stronger decay (the simpler classifier)
    torch.manual_seed(seed)
    module = RouterModule(fmap.vocab_sizes, k, lr=float(rc.lr), features=features,
                          weight_decay=decays if features == "embedding" else decays[0], **extra)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    # whole batches: the tensors are indexed once per batch by an index tensor (no per-row __getitem__
    # + collate, no list of ints), in the order of a seeded RandomSampler
    order = RandomSampler(train_set, num_samples=per_epoch, generator=gen)
    train = _IndexedBatches(train_set.tensors, order, rbs)
    # one process (under trainer=ddp the cluster stage runs on rank 0 alone)
    trainer = build_trainer(cfg, epochs, [], None, out.parent, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, strategy="auto",
                            devices=1, num_nodes=1, limit_val_batches=0)  # fmt: skip
    t_fit = time.perf_counter()
    trainer.fit(module, train)
    fit_s = time.perf_counter() - t_fit
    router, wd, val_agreement = _choose_router(module, decays, data["val"])
    agreement = {}
    with torch.no_grad():
        for s, (x, c) in data.items():
            agreement[s] = float((router.route(x) == c).float().mean()) if len(c) else None
    report = {"rows": {s: len(c) for s, (_, c) in data.items()}, "features": features, "epochs": epochs,
              "steps": len(train) * epochs, "weight_decay": wd, "val_agreement_by_weight_decay": val_agreement,
              "agreement": agreement, "fit_seconds": round(fit_s, 3),
              "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    log.info("cluster stage: distilled router agrees with the exact assignment on %s of the test rows",
             f"{agreement['test']:.3f}" if agreement.get("test") is not None else "n/a")  # fmt: skip
    return router, report


def _router_rows(cfg: DictConfig, dm, fmap: FeatureMap, assigns, samples: dict) -> dict[str, Any]:
    """Each split's router rows (ids, exact cluster): the clustering's complete row sample, else read."""
    rc = cfg.cluster.router
    bs, seed = int(cfg.cluster.batch_size), int(cfg.seed)
    data = {}
    for s, a in assigns.items():
        sample = samples.get(s)
        if sample is not None and sample.complete and len(sample.keep) == len(a):
            data[s] = sample.rows(a, fmap.num_fields)
        else:
            data[s] = _rows_of(dm, s, a, int(rc.max_rows), seed, bs, fmap.num_fields)
    if not len(data["train"][1]):
        raise DataError(f"cluster.router.max_rows={rc.max_rows}: no train row drawn to fit the router on")
    return data


def _choose_router(module, decays: list[float], val) -> tuple[Any, float, dict[str, float | None]]:
    """The distilled router of the weight decay with the best validation agreement (a tie: the stronger
    decay): (router, its decay, the agreement of every decay)."""
    best: tuple[float, float, Any] | None = None
    val_agreement: dict[str, float | None] = {}
    x_val, c_val = val
    for i, wd in enumerate(decays):
        r = module.distilled(i).cpu()
        with torch.no_grad():
            a = float((r.route(x_val) == c_val).float().mean()) if len(c_val) else None
        val_agreement[f"{wd:g}"] = a
        score = -1.0 if a is None else a
        if best is None or score > best[0] or (score == best[0] and wd > best[1]):
            best = (score, wd, r)
    assert best is not None
    return best[2], best[1], val_agreement


def _metrics(info: dict[str, Any]) -> dict[str, Any]:
    m: dict[str, Any] = {"cluster/k": info["k"]}
    for c, n in enumerate(info["sizes"]["train"]):
        m[f"cluster/size_{c}"] = n
        m[f"cluster/dims_{c}"] = int(sum(info["field_dims"][c]))
    if "recovery" in info:
        m["cluster/recovery_min_f1"] = info["recovery"]["min_f1"]
    for split, a in ((info.get("router") or {}).get("agreement") or {}).items():
        if a is not None:
            m[f"cluster/router_agreement_{split}"] = a
    return m


def _log(cfg: DictConfig, logger: Any, metrics: dict[str, Any], out: Path) -> None:
    from ..loggers import build_logger, finish_loggers, log_image

    own = logger is None
    if own:
        logger = build_logger(cfg, f"{cfg.tag}")
    try:
        if logger is None:
            return
        logger.log_metrics({k: float(v) for k, v in metrics.items()})
        log_image(logger, "cluster/dims_heatmap", out / "dims_heatmap.png")
    finally:
        if own:
            finish_loggers()


__all__ = ["load_cluster_dir", "run", "check_cfg", "cluster_model", "majority_dims", "planted_recovery"]
