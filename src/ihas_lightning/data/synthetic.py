"""The planted synthetic dataset: CTR data with known instance-wise heterogeneity (iHAS's premise).

iHAS assumes that different *instances* need different embedding dimensions: a field that matters
for one kind of sample is noise for another. This generator plants exactly that, so the search
(instance-wise Bernoulli gates), cluster (K-Means over the gate masks) and retrain stages can be
checked against a known answer:

* ``F`` categorical fields with cardinalities drawn log-uniformly in ``[min_cardinality,
  max_cardinality]`` and Zipf-like value frequencies (``p(rank r) ~ (r + 1) ** -zipf_a``);
* field 0 is the ``key`` field (``key_cardinality`` values); its values are partitioned into
  ``num_groups`` latent groups (a fixed lookup ``group = key_groups[key value]``, balanced by mass),
  so the group of a sample is visible to the gate network through the key's embedding;
* each group ``g`` owns a disjoint set ``relevant(g)`` of ``relevant_per_group`` non-key fields,
  and only they drive the click probability::

      p = sigmoid(base_rate + signal / sqrt(R) * sum_{f in relevant(g)} w_{g,f}[x_f])

  with per-value weights ``w ~ N(0, 1)`` standardised to mean 0 / variance 1 under the field's
  value distribution, so the logit has standard deviation ``signal`` around ``base_rate``. Every
  other field (and the key itself) is noise for that group;
* ``label ~ Bernoulli(p)``.

Rows are i.i.d., so the split is contiguous: the first ``split[0]`` share is train, then val, then
test. Ids follow the real-data convention of :mod:`.feature_map` (vocabulary built on train with
``min_count``; 0 = OOV). Besides the field columns and ``label`` the Parquet files carry two
non-feature columns, ``_group`` (int8, the latent group) and ``_p`` (float32, the true click
probability), which the DataModule ignores and the acceptance analysis reads. ``truth.json`` holds
the planted answer and the Bayes-optimal test AUC / logloss (of the true ``p``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError
from ..utils import stable_hash, write_json
from .feature_map import LABEL, SPLITS, FeatureMap, Field

TRUTH = "truth.json"
KEY_FIELD = "key"
GROUP_COLUMN = "_group"
PROB_COLUMN = "_p"

# defaults for keys that conf/dataset/synthetic.yaml may omit
DEFAULTS: dict[str, Any] = {
    "rows": 200_000,
    "num_fields": 12,
    "num_groups": 2,
    "relevant_per_group": 3,
    "key_cardinality": 16,
    "min_cardinality": 8,
    "max_cardinality": 2000,
    "zipf_a": 1.1,
    "signal": 1.5,
    "base_rate": -1.2,
    "split": [0.8, 0.1, 0.1],
    "gen_seed": 7,
    "min_count": 1,
    "row_group_size": 65536,
}


def field_names(num_fields: int) -> list[str]:
    """``key``, ``f01``, ``f02``, ... (field 0 is the key field)."""
    return [KEY_FIELD] + [f"f{j:02d}" for j in range(1, num_fields)]


def synthetic_params(dcfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The validated generation parameters read from the dataset config (``dataset.*``)."""

    def get(key: str) -> Any:
        try:
            v = dcfg.get(key, None) if hasattr(dcfg, "get") else getattr(dcfg, key, None)
        except Exception:  # omegaconf missing-value errors
            v = None
        return DEFAULTS[key] if v is None else v

    p: dict[str, Any] = {}
    try:
        for k in ("rows", "num_fields", "num_groups", "relevant_per_group", "key_cardinality"):
            p[k] = int(get(k))
        for k in ("min_cardinality", "max_cardinality", "gen_seed", "min_count", "row_group_size"):
            p[k] = int(get(k))
        for k in ("zipf_a", "signal", "base_rate"):
            p[k] = float(get(k))
        p["split"] = [float(s) for s in get("split")]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'dataset': synthetic parameters must be numbers ({e})") from e

    def need(cond: bool, key: str, rule: str) -> None:
        if not cond:
            raise ConfigError(f"config key 'dataset.{key}': {rule} (got {p.get(key)})")

    need(p["rows"] >= 30, "rows", "must be >= 30")
    need(p["num_fields"] >= 2, "num_fields", "must be >= 2 (a key field plus at least one other)")
    need(p["num_groups"] >= 1, "num_groups", "must be >= 1")
    need(p["relevant_per_group"] >= 1, "relevant_per_group", "must be >= 1")
    need(
        p["num_groups"] * p["relevant_per_group"] <= p["num_fields"] - 1,
        "relevant_per_group",
        f"num_groups * relevant_per_group must be <= num_fields - 1 = {p['num_fields'] - 1} "
        "(the groups' relevant fields are disjoint non-key fields)",
    )
    need(p["num_groups"] <= 127, "num_groups", "must be <= 127 (stored as int8)")
    need(p["key_cardinality"] >= p["num_groups"], "key_cardinality", "must be >= num_groups")
    need(p["min_cardinality"] >= 2, "min_cardinality", "must be >= 2")
    need(p["max_cardinality"] >= p["min_cardinality"], "max_cardinality", "must be >= min_cardinality")
    need(p["zipf_a"] >= 0, "zipf_a", "must be >= 0 (0 = uniform values)")
    need(p["signal"] >= 0, "signal", "must be >= 0")
    need(p["min_count"] >= 1, "min_count", "must be >= 1")
    need(p["row_group_size"] >= 1, "row_group_size", "must be >= 1")
    s = p["split"]
    need(
        len(s) == 3 and all(x > 0 for x in s) and abs(sum(s) - 1.0) < 1e-6,
        "split",
        "must be three positive fractions [train, val, test] summing to 1",
    )
    return p


def _zipf_probs(card: int, a: float, rng: np.random.Generator) -> np.ndarray:
    """Value probabilities ~ (rank + 1) ** -a, with ranks assigned to raw values at random."""
    probs = np.arange(1, card + 1, dtype=np.float64) ** -a
    probs /= probs.sum()
    return probs[rng.permutation(card)]  # raw value v has probability probs[v]


def _sample(probs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    cdf = np.cumsum(probs)
    cdf[-1] = 1.0
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(probs) - 1)


def _balanced_groups(probs: np.ndarray, num_groups: int) -> np.ndarray:
    """Greedy partition of the key values into groups of near-equal probability mass."""
    group = np.empty(len(probs), dtype=np.int64)
    mass = np.zeros(num_groups)
    for v in np.argsort(-probs, kind="stable"):  # over key values (a few dozen), not over samples
        g = int(np.argmin(mass))
        group[v] = g
        mass[g] += probs[v]
    return group


def _standardised_weights(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    w = rng.standard_normal(len(probs))
    w -= probs @ w
    sd = math.sqrt(float(probs @ (w * w)))
    return w / sd if sd > 0 else w


def _vocab(train_raw: np.ndarray, card: int, min_count: int) -> np.ndarray:
    """Lookup raw value -> id: kept values (count >= min_count in train) get 1..V-1 ordered by
    count descending then value ascending; the rest map to the OOV id 0."""
    counts = np.bincount(train_raw, minlength=card)
    kept = np.flatnonzero(counts >= min_count)
    order = kept[np.lexsort((kept, -counts[kept]))]
    lookup = np.zeros(card, dtype=np.int32)
    lookup[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return lookup


def _auc_logloss(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import log_loss, roc_auc_score

    if y.min() == y.max():
        return float("nan"), float(log_loss(y, p, labels=[0, 1]))
    return float(roc_auc_score(y, p)), float(log_loss(y, p))


@dataclass
class _Planted:
    """The generative structure: field cardinalities and value probabilities, the key values' groups,
    each group's relevant fields and their per-value weights."""

    cards: list[int]
    probs: list[np.ndarray]
    key_groups_raw: np.ndarray
    relevant: list[list[int]]
    weights: dict[tuple[int, int], np.ndarray]


def _plant(prm: dict[str, Any], rng: np.random.Generator) -> _Planted:
    nf, ng, nr = prm["num_fields"], prm["num_groups"], prm["relevant_per_group"]
    lo, hi = math.log(prm["min_cardinality"]), math.log(prm["max_cardinality"])
    cards = [prm["key_cardinality"]] + [int(round(math.exp(v))) for v in rng.uniform(lo, hi, nf - 1)]
    probs = [_zipf_probs(c, prm["zipf_a"], rng) for c in cards]
    key_groups_raw = _balanced_groups(probs[0], ng)
    chosen = 1 + rng.permutation(nf - 1)[: ng * nr]
    relevant = [sorted(int(f) for f in chosen[g * nr : (g + 1) * nr]) for g in range(ng)]
    weights = {(g, f): _standardised_weights(probs[f], rng) for g in range(ng) for f in relevant[g]}
    return _Planted(cards, probs, key_groups_raw, relevant, weights)


def _samples(
    prm: dict[str, Any], pl: _Planted, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(raw values [n, F], latent group, true click probability, label)`` of every row."""
    n, nf, nr = prm["rows"], prm["num_fields"], prm["relevant_per_group"]
    raw = np.stack([_sample(pl.probs[j], n, rng) for j in range(nf)], axis=1)  # [n, F] raw values
    group = pl.key_groups_raw[raw[:, 0]]
    logit = np.full(n, prm["base_rate"], dtype=np.float64)
    scale = prm["signal"] / math.sqrt(nr)
    for g in range(prm["num_groups"]):
        rows = np.flatnonzero(group == g)
        contrib = np.zeros(len(rows))
        for f in pl.relevant[g]:
            contrib += pl.weights[(g, f)][raw[rows, f]]
        logit[rows] += scale * contrib
    p = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(n) < p).astype(np.int8)
    return raw, group, p, label


def _split_bounds(prm: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """The contiguous ``[a, b)`` row range of each split; an empty split is a config error."""
    n = prm["rows"]
    n_train = int(round(n * prm["split"][0]))
    n_val = int(round(n * prm["split"][1]))
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    for s, (a, b) in bounds.items():
        if b <= a:
            raise ConfigError(f"config key 'dataset.split': the {s} split is empty with rows={n}")
    return bounds


def _write_splits(
    out_dir: Path,
    prm: dict[str, Any],
    names: list[str],
    bounds: dict[str, tuple[int, int]],
    ids: np.ndarray,
    label: np.ndarray,
    group: np.ndarray,
    p: np.ndarray,
) -> dict[str, dict[str, Any]]:
    """``{split}.parquet`` (ids, label, ``_group``, ``_p``); the feature map's per-split record."""
    splits: dict[str, dict[str, Any]] = {}
    for s in SPLITS:
        a, b = bounds[s]
        cols = {name: pa.array(ids[a:b, j]) for j, name in enumerate(names)}
        cols[LABEL] = pa.array(label[a:b])
        cols[GROUP_COLUMN] = pa.array(group[a:b].astype(np.int8))
        cols[PROB_COLUMN] = pa.array(p[a:b].astype(np.float32))
        pq.write_table(pa.table(cols), out_dir / f"{s}.parquet", row_group_size=prm["row_group_size"])
        splits[s] = {"rows": b - a, "pos_rate": float(label[a:b].mean()), "file": f"{s}.parquet"}
    return splits


def _truth(
    prm: dict[str, Any],
    names: list[str],
    pl: _Planted,
    key_lookup: np.ndarray,
    bounds: dict[str, tuple[int, int]],
    label: np.ndarray,
    group: np.ndarray,
    p: np.ndarray,
) -> dict[str, Any]:
    """The planted answer (``truth.json``) and the Bayes-optimal scores of the true ``p``."""
    nf, ng = prm["num_fields"], prm["num_groups"]
    a, b = bounds["test"]
    auc, ll = _auc_logloss(label[a:b], p[a:b])
    va, vb = bounds["val"]
    val_auc, val_ll = _auc_logloss(label[va:vb], p[va:vb])
    seen = key_lookup > 0
    key_groups = {str(int(i)): int(g) for i, g in sorted(zip(key_lookup[seen], pl.key_groups_raw[seen]))}
    rel_names = {str(g): [names[f] for f in pl.relevant[g]] for g in range(ng)}
    all_rel = {f for r in pl.relevant for f in r}
    return {
        "key_field": KEY_FIELD,
        "groups": rel_names,
        "noise_fields": [names[f] for f in range(1, nf) if f not in all_rel],
        # key id (as written to the Parquet files) -> latent group; OOV id 0 is not listed
        "key_groups": key_groups,
        "bayes_test_auc": auc,
        "bayes_test_logloss": ll,
        "bayes_val_auc": val_auc,
        "bayes_val_logloss": val_ll,
        "group_sizes": {str(g): int((group == g).sum()) for g in range(ng)},
        "group_sizes_by_split": {
            s: {str(g): int((group[a:b] == g).sum()) for g in range(ng)} for s, (a, b) in bounds.items()
        },
        "cardinalities": dict(zip(names, pl.cards)),
        "pos_rate": float(label.mean()),
        "params": prm,
    }


def generate_synthetic(dcfg: Mapping[str, Any] | Any, out_dir: Path) -> FeatureMap:
    """Generate the planted dataset into ``out_dir`` (which exists) and return its feature map.

    Writes ``{train,val,test}.parquet``, ``feature_map.json`` and ``truth.json``. Deterministic in
    the config: the same parameters (``gen_seed`` included) give identical files."""
    prm = synthetic_params(dcfg)
    out_dir = Path(out_dir)
    rng = np.random.default_rng(prm["gen_seed"])
    nf = prm["num_fields"]
    names = field_names(nf)
    planted = _plant(prm, rng)
    raw, group, p, label = _samples(prm, planted, rng)

    # ---- split + vocabulary (built on train only, as for real data) ------------------------------
    bounds = _split_bounds(prm)
    n_train = bounds["train"][1]
    lookups = [_vocab(raw[:n_train, j], planted.cards[j], prm["min_count"]) for j in range(nf)]
    ids = np.empty((prm["rows"], nf), dtype=np.int32)
    for j in range(nf):
        ids[:, j] = lookups[j][raw[:, j]]
    vocab_sizes = [int(lk.max()) + 1 for lk in lookups]
    splits = _write_splits(out_dir, prm, names, bounds, ids, label, group, p)

    fmap = FeatureMap(
        dataset="synthetic",
        fields=[Field(name=nm, vocab_size=v) for nm, v in zip(names, vocab_sizes)],
        min_count=prm["min_count"],
        transforms={},
        splits=splits,
        row_group_size=prm["row_group_size"],
        config_hash=stable_hash({"synthetic": prm}),
        extra={"synthetic": True, "key_field": KEY_FIELD},
    )
    fmap.save(out_dir)
    write_json(out_dir / TRUTH, _truth(prm, names, planted, lookups[0], bounds, label, group, p))
    return fmap
