"""What the stages share, below them (no stage imports another): the run-dir layout, input
resolution (explicit config path > parent recorded in a manifest > this run's default), data access,
and loading what an earlier stage wrote (checkpoints with ``weights_only=True``, the cluster and
derive outputs, the retrained models)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from .artifacts import parent_path
from .errors import DataError

log = logging.getLogger("ihas_lightning")

SEARCH_DIR = "search"
BASE_DIR = "base"
CLUSTER_DIR = "cluster"
DERIVE_DIR = "derive"
RETRAIN_DIR = "retrain"
EVALUATE_DIR = "evaluate"
BEST = "best.ckpt"
ROUTER = "router.pt"  # cluster/: the distilled router (fast routing)
LAST = "last.ckpt"
STARTED = "started.json"  # a fit in progress: its config hash and parents (a killed fit resumes)


def output_dir(cfg: DictConfig) -> Path:
    out = Path(str(cfg.paths.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _given(value: Any) -> Path | None:
    return None if value in (None, "", "null") else Path(str(value)).expanduser()


def resolve_search_ckpt(cfg: DictConfig, cluster_dir: Path | None = None) -> Path:
    """``search.ckpt`` if set, else the one recorded by ``cluster_dir``'s manifest, else this run's."""
    from . import method

    p = _given(cfg.search.get("ckpt"))
    key = "search.ckpt"
    if p is None and method.skips_search(cfg):
        p, key = method.transfer_ckpt(cfg), "transfer.from"
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
    from .artifacts import verify_outputs

    bad = verify_outputs(p.parent)
    if bad is not None:  # a killed search's best.ckpt, or one changed since: never taken as input
        raise DataError(f"{p}: not the output of a finished search ({key}): {bad}")
    return p


def _resolve_stage_dir(cfg: DictConfig, stage: str, marker: str, retrain_dir: Path | None) -> Path:
    """``<stage>.dir`` if set, else the one recorded by ``retrain_dir``'s manifest, else this run's
    ``<stage>/``; a one-line DataError when it holds no ``marker`` file."""
    node = cfg.get(stage)
    p = _given(node.get("dir")) if node is not None else None
    key = f"{stage}.dir"
    if p is None and retrain_dir is not None:
        p = parent_path(retrain_dir, f"{stage}_dir")
        key = f"{retrain_dir}/manifest.json parents.{stage}_dir"
    if p is None:
        p = output_dir(cfg) / stage
        key = f"{stage}.dir (default: this run's {stage}/)"
    if not (p / marker).is_file():
        raise DataError(f"{p}: no {marker} ({key}); run stage={stage} first or set {stage}.dir=PATH")
    return p


def base_checkpoint(cfg: DictConfig) -> Path | None:
    """The run's Base model, the one ``stage=evaluate`` compares with and the retrain guard falls back
    to: ``evaluate.base_ckpt``, else this run's ``base/search/best.ckpt``; None when there is none."""
    p = _given(cfg.evaluate.get("base_ckpt"))
    if p is not None:
        if not p.is_file():
            raise DataError(f"{p}: Base checkpoint not found (evaluate.base_ckpt)")
        return p
    p = output_dir(cfg) / BASE_DIR / SEARCH_DIR / BEST
    return p if p.is_file() else None


def resolve_cluster_dir(cfg: DictConfig, retrain_dir: Path | None = None) -> Path:
    return _resolve_stage_dir(cfg, CLUSTER_DIR, "cluster.json", retrain_dir)


def resolve_derive_dir(cfg: DictConfig, retrain_dir: Path | None = None) -> Path:
    return _resolve_stage_dir(cfg, DERIVE_DIR, "arch.json", retrain_dir)


def resolve_arch_dir(cfg: DictConfig, retrain_dir: Path | None = None) -> tuple[Path, str]:
    """(dir, parent key) of the architecture the retrain stage builds: the cluster dir when the method
    derives by clustering (iHAS), else the derive dir."""
    from .method import phases

    if "cluster" in phases(cfg):
        return resolve_cluster_dir(cfg, retrain_dir), "cluster_dir"
    return resolve_derive_dir(cfg, retrain_dir), "derive_dir"


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
    from .data.dataset_dir import ensure_prepared

    return Path(ensure_prepared(cfg))


def make_datamodule(cfg: DictConfig, prepared: Path, batch_size: int, **kw: Any):
    from .data.datamodule import IHASDataModule

    bs = int(batch_size)
    eval_bs = int(cfg.evaluate.get("batch_size") or bs)
    for k, v in loader_kwargs(cfg).items():
        kw.setdefault(k, v)
    return IHASDataModule(str(prepared), batch_size=bs, eval_batch_size=eval_bs, seed=int(cfg.seed), **kw)


def loader_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The DataModule's loading knobs from ``dataset.*``: ``loader_mode`` (auto | in_memory | streaming;
    auto: in memory when the three splits fit ``memory_budget_gb``), ``memory_budget_gb`` (4) and
    ``device_resident``."""
    d = cfg.dataset
    return {
        "mode": str(d.get("loader_mode") or "auto"),
        "memory_budget_gb": float(d.get("memory_budget_gb") or 4.0),
        "device_resident": device_resident(cfg),
    }


def stage_device(cfg: DictConfig) -> torch.device:
    """The device of a stage's own passes over the data (the cluster stage's masked embeddings): CUDA
    when ``trainer.accelerator`` is a GPU (or ``auto`` with one present), else the CPU."""
    acc = str(cfg.trainer.get("accelerator", "cpu"))
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cpu")


def device_resident(cfg: DictConfig) -> bool:
    """``dataset.device_resident``; unset (null): on when ``trainer.accelerator`` is not the CPU."""
    v = cfg.dataset.get("device_resident")
    if v is None:
        acc = str(cfg.trainer.get("accelerator", "cpu"))
        return acc in ("gpu", "cuda", "mps") or (acc == "auto" and torch.cuda.is_available())
    return bool(v)


def iter_split(dm: Any, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Ordered pass over ``split`` in file order: (x int [B, F], y float [B]) tensors."""
    for batch in dm.split_dataloader(split, shuffle=False, batch_size=batch_size):
        x, y = batch[0], batch[1]
        yield torch.as_tensor(x), torch.as_tensor(y)


def split_batches(dm: Any, split: str, batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A whole split held in memory for repeated passes: (x batches in file order, all labels)."""
    xs, ys = [], []
    for x, y in iter_split(dm, split, batch_size):
        xs.append(x.clone())  # the loader may reuse its buffers
        ys.append(y.clone())
    return xs, torch.cat(ys) if ys else torch.zeros(0)


def split_tensors(dm: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = dm.split_arrays(split)
    return torch.as_tensor(np.asarray(x)), torch.as_tensor(np.asarray(y, dtype=np.float32))


def load_search(ckpt: Path, feature_map: Any):
    """The searched model (a gated DLRM) of a search checkpoint, checked against the dataset."""
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


# ---- loading what earlier stages wrote ----------------------------------------------------------------
def load_search_model(ckpt_path: str | Path, feature_map: Any = None):
    """Load a search-stage checkpoint (:class:`SearchModule` of any method, Base included) in eval mode,
    from its saved hyperparameters, with ``weights_only=True``.

    Raises a one-line DataError when the file is missing/unreadable or (given ``feature_map``) its
    field count or vocab sizes do not fit the prepared dataset."""
    from .modules.search import SearchModule

    path = Path(ckpt_path)
    if not path.is_file():
        raise DataError(f"{path}: search checkpoint not found")
    try:
        hp = torch.load(path, map_location="cpu", weights_only=True)["hyper_parameters"]
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is a data error
        raise DataError(f"{path}: not a readable search checkpoint ({type(e).__name__}: {e})") from e
    if feature_map is not None:
        check_fits(path, [int(v) for v in hp["vocab_sizes"]], feature_map)
    try:
        module = SearchModule.load_from_checkpoint(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a loadable search checkpoint ({type(e).__name__}: {e})") from e
    return module.eval()


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch recorded in a Lightning checkpoint (None when unreadable)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True).get("epoch"))
    except Exception:  # noqa: BLE001
        return None


def load_cluster_dir(cluster_dir: Path) -> dict[str, Any]:
    """cluster.json + centroids + assignments of a cluster output dir."""
    from .utils import read_json

    info = read_json(cluster_dir / "cluster.json")
    tensors = torch.load(cluster_dir / "centroids.pt", map_location="cpu", weights_only=True)
    info["centroids"] = tensors["centroids"]
    info["mean_mask"] = tensors["mean_mask"]
    for s in ("train", "val", "test"):
        p = cluster_dir / f"assign_{s}.npy"
        if not p.is_file():
            raise DataError(f"{p}: missing cluster assignment file (re-run stage=cluster)")
        info[f"assign_{s}"] = np.load(p)
    if (cluster_dir / ROUTER).is_file():
        info["router_state"] = torch.load(cluster_dir / ROUTER, map_location="cpu", weights_only=True)
    return info


def load_derive_dir(derive_dir: Path) -> dict[str, Any]:
    """arch.json (+ row_keep.npy) of a derive output dir, in the cluster dir's shape: one
    architecture (k=1) trained on every row, no routing."""
    from .utils import read_json

    p = derive_dir / "arch.json"
    if not p.is_file():
        raise DataError(f"{derive_dir}: no arch.json (run stage=derive first or set derive.dir=PATH)")
    info = read_json(p)
    info["centroids"] = None
    rk = info.get("row_keep_file")
    if rk:
        f = derive_dir / rk
        if not f.is_file():
            raise DataError(f"{f}: missing row-keep mask (re-run stage=derive)")
        info["row_keep"] = torch.from_numpy(np.load(f).astype(bool))
    else:
        info["row_keep"] = None
    em = info.get("entry_mask_file")
    info["entry_mask"] = None
    if em:
        f = derive_dir / em
        if not f.is_file():
            raise DataError(f"{f}: missing entry mask (re-run stage=derive)")
        info["entry_mask"] = torch.from_numpy(np.load(f).astype(bool))
    for s in ("train", "val", "test"):
        info[f"assign_{s}"] = None  # every row
    return info


def load_arch_dir(path: Path) -> dict[str, Any]:
    """The architecture source of the retrain stage: a cluster dir (iHAS) or a derive dir."""
    if (path / "cluster.json").is_file():
        info = load_cluster_dir(path)
        info.setdefault("row_keep", None)
        info.setdefault("entry_mask", None)
        return info
    return load_derive_dir(path)


def data_dir_for(cfg: DictConfig, info: dict[str, Any]) -> Path:
    """The prepared dataset an architecture was derived on (recorded in its json), else the config's."""
    from .data.feature_map import is_complete

    recorded = info.get("prepared_dir")
    if recorded and is_complete(recorded):
        return Path(recorded)
    return prepared_dir(cfg)


def check_cluster_fits(cluster_dir: Path, info: dict[str, Any], fmap: Any) -> None:
    name = "cluster.json" if (cluster_dir / "cluster.json").is_file() else "arch.json"
    if list(info["vocab_sizes"]) != list(fmap.vocab_sizes):
        raise DataError(f"{cluster_dir}/{name}: its vocab sizes do not match the prepared dataset")
    for s in ("train", "val", "test"):
        a = info.get(f"assign_{s}")
        if a is None:
            continue
        if len(a) != fmap.rows(s):
            raise DataError(
                f"{cluster_dir}/assign_{s}.npy: {len(a)} assignments but the prepared {s} split has {fmap.rows(s)} rows"
            )


def load_cluster_models(retrain_dir: Path, k: int) -> list[Any]:
    """The best retrained module of every cluster (one-line DataError for a missing one)."""
    from .modules.retrain import RetrainModule

    mods = []
    for c in range(k):
        p = retrain_dir / f"cluster_{c}" / BEST
        if not p.is_file():
            raise DataError(f"{p}: missing retrained model of cluster {c} (re-run stage=retrain)")
        try:
            m = RetrainModule.load_from_checkpoint(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt / foreign checkpoint
            raise DataError(f"{p}: not a loadable retrain checkpoint ({type(e).__name__}: {e})") from e
        mods.append(m.eval())
    return mods
