"""The sharding plan: which rows and batch sizes each rank, and each loader worker, gets in an epoch.

:func:`rank_plan` cuts an epoch's virtual row order into contiguous per-rank ranges that differ by
at most one row and gives every rank the same number of batches (so DDP's collectives stay in
step; a rank with fewer rows makes its last batch smaller, never empty), or ``(N // W) // B`` full
batches with ``drop_last``; :func:`worker_plan` cuts one rank's batch slots into contiguous blocks
for the DataLoader workers. Pure functions of the sizes: no data is read here.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError


def rank_plan(
    n: int, world: int, rank: int, batch_size: int, drop_last: bool = False
) -> tuple[int, np.ndarray]:
    """``(start, sizes)``: rank ``rank``'s first row in the epoch's virtual order and its batch sizes.

    Ranks get contiguous ranges whose lengths differ by at most one; every rank gets the same number
    of batches (``ceil(ceil(n / world) / batch_size)``): full batches, then the shortfall of a rank
    with fewer rows taken off its last batch(es), each kept >= 1 row. ``sum(sizes)`` is the rank's
    row count, so each row is in exactly one batch. With ``drop_last``: ``(n // world) // batch_size``
    full batches per rank."""
    bounds = (np.arange(world + 1, dtype=np.int64) * n) // world
    start, rows = int(bounds[rank]), int(bounds[rank + 1] - bounds[rank])
    if drop_last:
        return start, np.full((n // world) // batch_size, batch_size, dtype=np.int64)
    max_rows = -(-n // world)
    nb = -(-max_rows // batch_size)
    if rows < nb:
        raise ConfigError(
            f"IHASDataModule: {n} rows cannot be split into equal batch counts over {world} ranks with "
            f"batch_size={batch_size} (a rank would get an empty batch); use fewer ranks or a larger batch"
        )
    sizes = np.full(nb, batch_size, dtype=np.int64)
    excess = nb * batch_size - rows
    i = nb - 1
    while excess > 0:  # at most two iterations: ranks differ by <= 1 row
        take = min(excess, int(sizes[i]) - 1)
        sizes[i] -= take
        excess -= take
        i -= 1
    return start, sizes


def worker_plan(start: int, sizes: np.ndarray, worker: int, num_workers: int) -> tuple[int, np.ndarray]:
    """A worker's contiguous block of its rank's batch slots: ``(first row, sizes)``."""
    cut = (np.arange(num_workers + 1, dtype=np.int64) * len(sizes)) // num_workers
    a, b = int(cut[worker]), int(cut[worker + 1])
    return start + int(sizes[:a].sum()), sizes[a:b]
