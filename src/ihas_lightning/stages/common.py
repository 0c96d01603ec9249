"""Helpers shared by the cluster / retrain / evaluate / all stages: run-dir layout, input resolution
(explicit config path > parent recorded in a manifest > this run's default), and data access."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from ..artifacts import parent_path
from ..errors import DataError

log = logging.getLogger("ihas_lightning")

SEARCH_DIR = "search"
BASE_DIR = "base"
CLUSTER_DIR = "cluster"
RETRAIN_DIR = "retrain"
EVALUATE_DIR = "evaluate"
BEST = "best.ckpt"


def output_dir(cfg: DictConfig) -> Path:
    out = Path(str(cfg.paths.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _given(value: Any) -> Path | None:
    return None if value in (None, "", "null") else Path(str(value)).expanduser()


def resolve_search_ckpt(cfg: DictConfig, cluster_dir: Path | None = None) -> Path:
    """``search.ckpt`` if set, else the one recorded by ``cluster_dir``'s manifest, else this run's."""
    p = _given(cfg.search.get("ckpt"))
    key = "search.ckpt"
    if p is None and cluster_dir is not None:
        p = parent_path(cluster_dir, "search_ckpt")
        key = f"{cluster_dir}/manifest.json parents.search_ckpt"
    if p is None:
        p = output_dir(cfg) / SEARCH_DIR / BEST
        key = "search.ckpt (default: this run's search/best.ckpt)"
    if not p.is_file():
        raise DataError(
            f"{p}: search checkpoint not found ({key}); run stage=search first or set search.ckpt=PATH"
        )
    return p


def resolve_cluster_dir(cfg: DictConfig, retrain_dir: Path | None = None) -> Path:
    p = _given(cfg.cluster.get("dir"))
    key = "cluster.dir"
    if p is None and retrain_dir is not None:
        p = parent_path(retrain_dir, "cluster_dir")
        key = f"{retrain_dir}/manifest.json parents.cluster_dir"
    if p is None:
        p = output_dir(cfg) / CLUSTER_DIR
        key = "cluster.dir (default: this run's cluster/)"
    if not (p / "cluster.json").is_file():
        raise DataError(f"{p}: no cluster.json ({key}); run stage=cluster first or set cluster.dir=PATH")
    return p


def resolve_retrain_dir(cfg: DictConfig) -> Path:
    p = _given(cfg.retrain.get("dir"))
    key = "retrain.dir"
    if p is None:
        p = output_dir(cfg) / RETRAIN_DIR
        key = "retrain.dir (default: this run's retrain/)"
    if not (p / "retrain.json").is_file():
        raise DataError(f"{p}: no retrain.json ({key}); run stage=retrain first or set retrain.dir=PATH")
    return p


def prepared_dir(cfg: DictConfig) -> Path:
    from .prepare import ensure_prepared

    return Path(ensure_prepared(cfg))


def make_datamodule(cfg: DictConfig, prepared: Path, batch_size: int, **kw: Any):
    from ..data.datamodule import IHASDataModule

    bs = int(batch_size)
    eval_bs = int(cfg.evaluate.get("batch_size") or bs)
    return IHASDataModule(str(prepared), batch_size=bs, eval_batch_size=eval_bs, seed=int(cfg.seed), **kw)


def iter_split(dm: Any, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Ordered pass over ``split`` in file order: (x int [B, F], y float [B]) tensors."""
    for batch in dm.split_dataloader(split, shuffle=False, batch_size=batch_size):
        x, y = batch[0], batch[1]
        yield torch.as_tensor(x), torch.as_tensor(y)


def split_tensors(dm: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = dm.split_arrays(split)
    return torch.as_tensor(np.asarray(x)), torch.as_tensor(np.asarray(y, dtype=np.float32))


def load_search(ckpt: Path, feature_map: Any):
    """The searched model (a gated DLRM) of a search checkpoint, checked against the dataset."""
    from .search import load_search_model

    module = load_search_model(ckpt, feature_map=feature_map)
    model = module.model.eval()
    if model.gate is None:
        raise DataError(
            f"{ckpt}: not an iHAS search checkpoint (the model has no Bernoulli gate; method=base?)"
        )
    return model


def check_fits(ckpt: Path, vocab_sizes: list[int], feature_map: Any) -> None:
    """One-line DataError when a model's fields/vocab do not fit the prepared dataset."""
    fm_vocab = list(feature_map.vocab_sizes)
    if len(vocab_sizes) != len(fm_vocab):
        raise DataError(
            f"{ckpt}: the checkpoint has {len(vocab_sizes)} fields but the prepared dataset has {len(fm_vocab)}"
        )
    if list(vocab_sizes) != fm_vocab:
        bad = next(i for i, (a, b) in enumerate(zip(vocab_sizes, fm_vocab)) if a != b)
        raise DataError(
            f"{ckpt}: vocab size of field {feature_map.field_names[bad]!r} is {vocab_sizes[bad]} "
            f"in the checkpoint but {fm_vocab[bad]} in the prepared dataset"
        )
