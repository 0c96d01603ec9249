"""Stage ``prepare``: make sure a prepared dataset (Parquet splits + feature map) exists, and print
a short summary. The work is :func:`ihas_lightning.data.dataset_dir.ensure_prepared`, which every
other stage also calls first."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from ..data.dataset_dir import ensure_prepared, validate_config
from ..data.feature_map import SPLITS, FeatureMap

__all__ = ["check_cfg", "ensure_prepared", "run", "validate_config"]


def check_cfg(cfg: DictConfig) -> None:
    """``dataset.*`` and ``prepare.*``, before anything is read."""
    validate_config(cfg)


def run(cfg: DictConfig) -> dict[str, Any]:
    """``stage=prepare``: ensure the prepared dataset and print a short summary."""
    path = ensure_prepared(cfg)
    fm = FeatureMap.load(path)
    total_vocab = int(sum(fm.vocab_sizes))
    rows = {s: fm.rows(s) for s in SPLITS}
    print(
        f"prepared {fm.dataset} at {path}: {fm.num_fields} fields, total vocab {total_vocab:,}, "
        + ", ".join(f"{s} {rows[s]:,} rows (pos {fm.splits[s].get('pos_rate', 0.0):.3f})" for s in SPLITS)
        + (f", skipped {fm.extra['skipped_rows']} bad rows" if fm.extra.get("skipped_rows") else ""),
        flush=True,
    )
    metrics: dict[str, Any] = {f"rows/{s}": rows[s] for s in SPLITS}
    metrics["vocab/total"] = total_vocab
    metrics["fields"] = fm.num_fields
    metrics["prepared_dir"] = str(path)
    return metrics
