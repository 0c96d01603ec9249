"""The per-field vocabulary: token counts on the training split, min-count, ids, and its file.

:class:`TokenCounter` counts a field's train tokens with memory bounded by the distinct tokens
(``np.unique`` per block, merged with geometric compaction); :func:`build_vocab` keeps the tokens
seen at least ``min_count`` times (:func:`min_count_of`: one number or a per-field mapping) and
orders them by count descending, then key ascending, giving ids ``1..V-1`` (0 is the field's OOV
id); :class:`Encoder` maps token keys to those ids. ``vocab.parquet`` (:func:`save_vocab` /
:func:`load_encoders`) keeps every field's kept keys with their ids, so new raw rows can be encoded
later exactly as at preparation time (serving).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import DataError
from .feature_map import FeatureMap

# vocabularies larger than this are looked up by binary search instead of a per-block hash set
_INDEX_IN_MAX_VOCAB = 1 << 20


class TokenCounter:
    """Per-field counts of uint64 token keys, memory bounded by the number of distinct tokens.

    Each block contributes its own unique (key, count) pairs; pending pairs are folded into the
    sorted table when they outgrow it (geometric compaction, so the amortised cost is linear)."""

    def __init__(self, min_pending: int = 1 << 18):
        self.keys = np.zeros(0, dtype=np.uint64)
        self.counts = np.zeros(0, dtype=np.int64)
        self._pk: list[np.ndarray] = []
        self._pc: list[np.ndarray] = []
        self._pending = 0
        self._min_pending = min_pending

    def add(self, keys: np.ndarray) -> None:
        if len(keys) == 0:
            return
        u, c = np.unique(keys, return_counts=True)
        self._pk.append(u)
        self._pc.append(c.astype(np.int64))
        self._pending += len(u)
        if self._pending > max(len(self.keys), self._min_pending):
            self.compact()

    def compact(self) -> None:
        if not self._pk:
            return
        k = np.concatenate([self.keys, *self._pk])
        c = np.concatenate([self.counts, *self._pc])
        self._pk, self._pc, self._pending = [], [], 0
        u, inv = np.unique(k, return_inverse=True)
        self.keys = u
        self.counts = np.bincount(inv.reshape(-1), weights=c, minlength=len(u)).astype(np.int64)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self.compact()
        return self.keys, self.counts


def build_vocab(keys: np.ndarray, counts: np.ndarray, min_count: int) -> np.ndarray:
    """Kept token keys in id order (id = position + 1): count >= min_count, by count desc, key asc."""
    keep = counts >= min_count
    k, c = keys[keep], counts[keep]
    order = np.lexsort((k, -c))
    return k[order]


class Encoder:
    """token key -> id (kept vocabulary ids 1..V-1, everything else the OOV id 0)."""

    def __init__(self, kept: np.ndarray):
        self.kept = kept
        self.vocab_size = len(kept) + 1
        if len(kept) <= _INDEX_IN_MAX_VOCAB:
            self._set = pa.array(kept, type=pa.uint64())
            self._sorted = None
        else:
            order = np.argsort(kept, kind="stable")
            self._sorted = (kept[order], (order + 1).astype(np.int32))

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        if len(self.kept) == 0:
            return np.zeros(len(keys), dtype=np.int32)
        if self._sorted is None:
            idx = pc.index_in(pa.array(keys, type=pa.uint64()), value_set=self._set)
            return np.asarray(pc.fill_null(idx, -1), dtype=np.int32) + 1
        sk, sid = self._sorted
        pos = np.searchsorted(sk, keys)
        pos[pos >= len(sk)] = 0
        return np.where(sk[pos] == keys, sid[pos], 0).astype(np.int32)


VOCAB_FILE = "vocab.parquet"


def save_vocab(out_dir: Path, fields: Sequence[str], encoders: Sequence[Encoder]) -> None:
    """``vocab.parquet``: one row per kept token, (``field``, ``id``, ``key``), ids 1..V-1 per field.

    ``key`` is the 64-bit token key of :func:`string_keys` / :func:`numeric_keys`, so new raw rows
    can be encoded exactly as at preparation time (for serving): key -> id, unseen keys -> 0."""
    sizes = [len(e.kept) for e in encoders]
    codes = np.repeat(np.arange(len(fields), dtype=np.int32), sizes)
    ids = np.concatenate([np.arange(1, n + 1, dtype=np.int32) for n in sizes] + [np.zeros(0, np.int32)])
    keys = np.concatenate([e.kept.astype(np.uint64) for e in encoders] + [np.zeros(0, np.uint64)])
    table = pa.table(
        {
            "field": pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(list(fields), pa.string())),
            "id": pa.array(ids),
            "key": pa.array(keys, type=pa.uint64()),
        }
    )
    pq.write_table(table, Path(out_dir) / VOCAB_FILE)


def load_encoders(prepared_dir: Path, feature_map: FeatureMap | None = None) -> list[Encoder]:
    """The per-field :class:`Encoder` s of a prepared real dataset (inverse of :func:`save_vocab`)."""
    prepared_dir = Path(prepared_dir)
    fm = feature_map or FeatureMap.load(prepared_dir)
    path = prepared_dir / VOCAB_FILE
    if not path.is_file():
        raise DataError(
            f"{path}: no saved vocabulary (prepared by an older version or a synthetic dataset); "
            "prepare again with prepare.overwrite=true"
        )
    t = pq.read_table(path)
    col = t["field"].combine_chunks()
    codes, names = np.asarray(col.indices), col.dictionary.to_pylist()
    ids, keys = t["id"].to_numpy(), t["key"].to_numpy()
    encoders = []
    for f in fm.fields:
        sel = codes == names.index(f.name) if f.name in names else np.zeros(len(t), dtype=bool)
        order = np.argsort(ids[sel], kind="stable")
        kept = keys[sel][order].astype(np.uint64)
        if len(kept) + 1 != f.vocab_size or not np.array_equal(ids[sel][order], np.arange(1, len(kept) + 1)):
            raise DataError(f"{path}: vocabulary of field {f.name!r} does not match feature_map.json")
        encoders.append(Encoder(kept))
    return encoders


def min_count_of(min_count: Any, name: str) -> int:
    if isinstance(min_count, Mapping):
        return int(min_count.get(name, min_count.get("default", 1)))
    return int(min_count)
