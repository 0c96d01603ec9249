"""Small shared helpers: stable hashing, atomic output directories, JSON I/O, seeding."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def stable_hash(obj: Any, n: int = 16) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), truncated to ``n`` hex chars."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def file_identity(path: str | os.PathLike) -> dict:
    """Cheap identity of an input file: resolved path, size and mtime (not a content hash)."""
    p = Path(path)
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file + rename) so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temp_dirs(final: str | os.PathLike) -> list[Path]:
    """Remove ``final``'s temporary siblings left by processes that died (SIGKILL, power loss):
    ``.<name>.tmp-<pid>-*`` of a pid that no longer runs. Returns what was removed (logged)."""
    import logging

    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for p in final.parent.glob(f".{final.name}.tmp-*"):
        parts = p.name[len(f".{final.name}.tmp-") :].split("-")
        if p.is_dir() and parts and parts[0].isdigit() and not _alive(int(parts[0])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        logging.getLogger("ihas_lightning").info(
            "removed %d temporary dir(s) of dead processes beside %s", len(removed), final
        )
    return removed


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to ``final``.

    On any exception the temporary directory is removed and ``final`` is left untouched, so a
    half-written output never passes for complete. With ``overwrite`` an existing ``final`` is
    replaced only after the new one is fully written. Under trainer=ddp only global rank 0 renames;
    the other ranks get a scratch directory that is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    from .distributed import is_global_zero

    if not is_global_zero():  # trainer=ddp: rank 0 writes the outputs; another rank's are scratch
        tmp = final.with_name(f".{final.name}.scratch-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    clean_stale_temp_dirs(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} appeared while writing")
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, final)
            except OSError as e:  # another process renamed its copy into place since the check above
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and final.exists():
                    raise FileExistsError(f"{final} appeared while writing") from e
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (quietly; Lightning's version logs a line per call)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
