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


def output_entries(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Size and digest of every file directly in ``directory`` (the manifest excluded)."""
    d = Path(directory)
    return {
        p.name: {"size": p.stat().st_size, "sha256": file_digest(p)}
        for p in sorted(d.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` with the size and digest of each output file beside it (``outputs``):
    what a later reuse verifies before it trusts the directory."""
    path = Path(directory) / MANIFEST
    # where the stage dir sat (its parent; an atomic temp dir is renamed within it): lets a moved run
    # dir find its parents by their relative location (:func:`parent_path`)
    where = str(Path(directory).resolve().parent)
    write_json(path, {**manifest, "outputs": output_entries(directory), "written_in": where})
    return path


def verify_outputs(directory: str | os.PathLike) -> str | None:
    """None when every output recorded in ``directory``'s manifest is there with its size and digest;
    else why not (one line). A directory without a manifest is incomplete."""
    d = Path(directory)
    m = read_manifest(d)
    if m is None:
        return f"{d}: no {MANIFEST} (the stage that writes it did not finish)"
    for name, want in (m.get("outputs") or {}).items():
        p = d / name
        if not p.is_file():
            return f"{p}: missing (listed in {d / MANIFEST})"
        if p.stat().st_size != want.get("size"):
            return f"{p}: {p.stat().st_size} bytes, {want.get('size')} when it was written"
        if file_digest(p) != want.get("sha256"):
            return f"{p}: its content changed since it was written (digest mismatch)"
    return None


def same_origin(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two manifests (or start records) of the same config and parent contents."""
    return a.get("config_hash") == b.get("config_hash") and _content(a.get("parents")) == _content(
        b.get("parents")
    )


def _content(parents: dict[str, Any]) -> dict[str, Any]:
    """Parent entries without their locations: a moved run dir is still the same content."""
    return {k: {kk: vv for kk, vv in (v or {}).items() if kk != "path"} for k, v in (parents or {}).items()}


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
    p = Path(m["parents"][name]["path"])
    if not p.exists() and m.get("written_in"):
        # the run dir was moved: the parent at the same place relative to this stage dir
        moved = Path(directory).resolve().parent / os.path.relpath(p, m["written_in"])
        if moved.exists():
            return Path(os.path.normpath(moved))
    return p


def is_current(directory: str | os.PathLike, manifest: dict[str, Any], required: list[str]) -> bool:
    """True when ``directory`` holds ``required`` files and a manifest with the same config hash and
    parents (by content, not location) as ``manifest``, and every output file it lists still has its
    recorded size and digest (used to skip work on resume; a mismatch is logged in one line)."""
    import logging

    d = Path(directory)
    old = read_manifest(d)
    if old is None or not all((d / f).is_file() for f in required):
        return False
    if old.get("config_hash") != manifest["config_hash"] or _content(old.get("parents")) != _content(
        manifest["parents"]
    ):
        return False
    bad = verify_outputs(d)
    if bad is not None:
        logging.getLogger("ihas_lightning").warning(
            "%s; re-running the %s stage", bad, manifest.get("stage", "")
        )
        return False
    return True
