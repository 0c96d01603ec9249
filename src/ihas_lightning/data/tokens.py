"""Token keys: every raw cell becomes a 64-bit key, vectorised over whole Arrow columns.

This module is the one place that decides what a token *is*: strings of up to 8 bytes are packed
big-endian (so key order == byte order, and an empty cell is key 0), longer strings are hashed with
:func:`splitmix64`, and numeric tokens (after Criteo's ``floor(ln(x)^2)`` discretization,
:func:`log_square`) map order-preservingly into ``uint64`` with key 0 reserved for "missing". The
inverses (:func:`key_to_token`, :func:`numeric_key_to_token`) serve logs, exports and tests.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_MISSING_KEY = np.uint64(0)
_SIGN = np.uint64(1 << 63)


def splitmix64(x: np.ndarray | int) -> np.ndarray:
    """The splitmix64 finaliser on uint64 (wrapping arithmetic): a counter-based hash."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _string_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets[n+1] int64, data uint8) of an Arrow string array, zero-copy where possible."""
    n = len(arr)
    bufs = arr.buffers()
    if pa.types.is_large_string(arr.type):
        off = np.frombuffer(bufs[1], dtype=np.int64, count=n + 1, offset=arr.offset * 8)
    else:
        off = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4).astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return off, data


def string_keys(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit token keys of a string column; null/empty -> 0.

    Strings of <= 8 bytes are packed big-endian, zero padded (key order == byte order); longer
    strings get a 64-bit hash of their bytes."""
    if isinstance(arr, pa.ChunkedArray):
        arr = pa.concat_arrays(arr.chunks) if arr.num_chunks != 1 else arr.chunk(0)
    n = len(arr)
    out = np.zeros(n, dtype=np.uint64)
    if n == 0:
        return out
    off, data = _string_parts(arr)
    raw_lens = np.diff(off)
    valid = np.asarray(arr.is_valid()) if arr.null_count else None
    if np.all((raw_lens == 8) | (raw_lens == 0)):
        # fast path (Criteo / Avazu ids: 8 hex digits or empty): the bytes are contiguous
        nz = raw_lens == 8
        out[nz] = data[off[0] : off[-1]].view(">u8").astype(np.uint64)
        if valid is not None:
            out[~valid] = 0
        return out
    lens = raw_lens if valid is None else np.where(valid, raw_lens, 0)
    short = (lens > 0) & (lens <= 8)
    if short.any():
        # pack byte j of every string of length > j, big-endian, zero padded
        starts = off[:-1]
        last = max(len(data) - 1, 0)
        for j in range(int(lens[short].max())):
            has = short & (lens > j)
            b = data[np.minimum(starts + j, last)].astype(np.uint64) if len(data) else np.zeros(n, np.uint64)
            out |= np.where(has, b, np.uint64(0)) << np.uint64(8 * (7 - j))
    long = lens > 8
    if long.any():
        l_off, l_len = off[:-1][long], lens[long]
        starts = np.cumsum(l_len) - l_len
        pos = np.arange(int(l_len.sum())) - np.repeat(starts, l_len)
        byte = data[np.repeat(l_off, l_len) + pos].astype(np.uint64)
        contrib = splitmix64(byte | (pos.astype(np.uint64) << np.uint64(8)))
        with np.errstate(over="ignore"):
            acc = np.add.reduceat(contrib, starts)
        h = splitmix64(acc ^ (l_len.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)))
        out[long] = np.where(h == 0, np.uint64(1), h)
    return out


def key_to_token(key: int) -> str:
    """Inverse of the packing in :func:`string_keys` for tokens of <= 8 bytes (for logs and tests)."""
    return int(key).to_bytes(8, "big").rstrip(b"\x00").decode("utf-8", "replace")


def log_square(x: np.ndarray) -> np.ndarray:
    """Criteo numeric discretization: ``floor(ln(x)^2)`` for ``x > 2``, else ``x`` itself (int64)."""
    x = np.asarray(x, dtype=np.int64)
    big = x > 2
    out = x.copy()
    lx = np.log(x[big].astype(np.float64))
    out[big] = np.floor(lx * lx).astype(np.int64)
    return out


def numeric_keys(values: np.ndarray, missing: np.ndarray | None) -> np.ndarray:
    """int64 numeric tokens -> order-preserving uint64 keys; key 0 is the 'missing' token."""
    keys = values.astype(np.int64).view(np.uint64) ^ _SIGN
    if missing is not None and missing.any():
        keys = np.where(missing, _MISSING_KEY, keys)
    return keys


def numeric_key_to_token(key: int) -> int | None:
    """Inverse of :func:`numeric_keys` (``None`` = missing)."""
    if int(key) == 0:
        return None
    v = int(key) ^ (1 << 63)
    return v - (1 << 64) if v >= 1 << 63 else v
