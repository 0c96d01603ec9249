"""Artifact manifests: what every stage directory records about how it was made.

Each stage output directory (``base/``, ``search/``, ``cluster/``, ``retrain/``, ``retrain/cluster_<k>/``,
``evaluate/``) holds a ``manifest.json``::

    {"stage": "cluster",
     "config_hash": "<sha256[:16] of the stage's config subset>",
     "config": {... the config subset that was hashed ...},
     "parents": {"search_ckpt": {"path": "/abs/search/best.ckpt", "sha256": "..."}, ...},
     "created": "2025-..Z", "versions": {"torch": ..., "lightning": ...}}

The parent entries let a later stage be run alone from one path (``stage=evaluate retrain.dir=X``
finds the cluster dir from X's manifest, and the search checkpoint from the cluster dir's), and
the hashes let a re-run decide whether an existing output is still valid (resume) or stale.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import DataError
from .utils import read_json, stable_hash, write_json

MANIFEST = "manifest.json"
# files up to this size get a content hash; larger ones (prepared Parquet) a cheap identity
_HASH_LIMIT = 256 * 1024 * 1024


def config_subset(cfg: DictConfig, keys: list[str]) -> dict[str, Any]:
    """The resolved values of the dotted ``keys`` of ``cfg`` (missing keys -> None)."""
    out: dict[str, Any] = {}
    for key in keys:
        node = OmegaConf.select(cfg, key, default=None)
        out[key] = (
            OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node
        )
    return out


def config_hash(cfg: DictConfig, keys: list[str]) -> str:
    return stable_hash(config_subset(cfg, keys))


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's content (small files) or of its (size, mtime) identity (large files)."""
    p = Path(path)
    st = p.stat()
    if st.st_size > _HASH_LIMIT:
        return "identity:" + stable_hash({"size": st.st_size, "mtime_ns": st.st_mtime_ns})
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def parent_entry(path: str | os.PathLike) -> dict[str, Any]:
    """Identity of a parent artifact: a file (content hash) or a stage dir (its manifest's hash)."""
    p = Path(path).resolve()
    if p.is_dir():
        m = p / MANIFEST
        return {"path": str(p), "manifest_sha256": file_digest(m) if m.is_file() else None}
    return {"path": str(p), "sha256": file_digest(p)}


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("torch", "lightning", "sklearn"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            pass
    return out


def make_manifest(
    stage: str,
    cfg: DictConfig,
    keys: list[str],
    parents: dict[str, str | os.PathLike] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    subset = config_subset(cfg, keys)
    return {
        "stage": stage,
        "config_hash": stable_hash(subset),
        "config": subset,
        "parents": {k: parent_entry(v) for k, v in (parents or {}).items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        **(extra or {}),
    }


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST
    write_json(path, manifest)
    return path


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except ValueError as e:
        raise DataError(f"{path}: malformed manifest ({e})") from e


def parent_path(directory: str | os.PathLike, name: str) -> Path | None:
    """The path of parent ``name`` recorded in ``directory``'s manifest, if any."""
    m = read_manifest(directory)
    if not m or name not in m.get("parents", {}):
        return None
    return Path(m["parents"][name]["path"])


def is_current(directory: str | os.PathLike, manifest: dict[str, Any], required: list[str]) -> bool:
    """True when ``directory`` holds ``required`` files and a manifest with the same config hash and
    parents as ``manifest`` (used to skip work on resume)."""
    d = Path(directory)
    old = read_manifest(d)
    if old is None or not all((d / f).is_file() for f in required):
        return False
    return old.get("config_hash") == manifest["config_hash"] and old.get("parents") == manifest["parents"]
