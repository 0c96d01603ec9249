"""Row -> split assignment of a single raw log: a counter-based hash, no global shuffle.

Each row's split (0=train, 1=val, 2=test) is a pure function of ``(split_seed, global row index)``
through :func:`~ihas_lightning.data.tokens.splitmix64`, so it is deterministic, independent of how
the file is cut into blocks, and the same in both passes of the preparation. (Given
``train/val/test`` files need no assignment: each file is its split.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .tokens import splitmix64


def assign_split(row_index: np.ndarray, seed: int, fractions: Sequence[float]) -> np.ndarray:
    """Split code (0=train, 1=val, 2=test) of each global row index: a pure function of (seed, index)."""
    salt = splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
    h = splitmix64(np.asarray(row_index, dtype=np.uint64) ^ salt)
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    c0, c1 = float(fractions[0]), float(fractions[0]) + float(fractions[1])
    return np.where(u < c0, 0, np.where(u < c1, 1, 2)).astype(np.uint8)
