"""The batch stream both data modes share: the base dataset, its loader, and the seeding rules.

:class:`BatchDataset` is an ``IterableDataset`` that yields whole ``(x int32 [B, F], y float32
[B])`` batches from a :mod:`.sharding` plan: it holds the rank's plan, the epoch, the slice of each
global batch an interleaved (training) stream keeps, the endless cycling of the search stream and
its resume point; the data modes (:mod:`.in_memory`, :mod:`.streaming`) only say how the plan's
batches are read. :class:`BatchLoader` wraps one in ``DataLoader(batch_size=None)`` (no collate)
and hands it the epoch at each ``iter()``. :func:`stream_seed` derives each shuffle's seed from
``(seed, stream, epoch, ...)``, so the loaders' random streams are independent and reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import DataError
from .feature_map import LABEL
from .sharding import rank_plan

Batch = tuple[torch.Tensor, torch.Tensor]


def stream_seed(*parts: int) -> int:
    """A 32-bit seed from integer parts (each taken mod 2**32): one random stream per combination."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def table_to_tensors(table: Any, fields: list[str]) -> Batch:
    """A pyarrow table of the prepared format -> ``(x int32 [n, F] contiguous, y float32 [n])``."""
    x = np.empty((table.num_rows, len(fields)), dtype=np.int32)
    for j, name in enumerate(fields):
        x[:, j] = table.column(name).to_numpy()
    y = table.column(LABEL).to_numpy().astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


class BatchDataset(IterableDataset):
    """Common part of both modes: sharding, epochs, endless cycling (for the search stream)."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        rank: int,
        world: int,
        drop_last: bool,
        stream: int,
        infinite: bool = False,
        interleave: bool = False,
    ):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.stream, self.infinite = stream, infinite
        self.epoch = 0
        self.start_batch = 0  # an endless stream: batches to pass over at the next iter() (a resume)
        # interleave (training streams under DDP): every rank follows the one-process stream of GLOBAL
        # batches of batch_size and keeps its slice of each, so ranks train on exactly the batches one
        # process would (see the module docstring)
        self.interleave = bool(interleave) and world > 1
        if self.interleave:
            self.start, self.sizes = rank_plan(n, 1, 0, batch_size, drop_last)
        else:
            self.start, self.sizes = rank_plan(n, world, rank, batch_size, drop_last)
        if infinite and len(self.sizes) == 0:
            raise DataError("IHASDataModule: the search split has no rows for this rank; it cannot cycle")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (all workers together)."""
        if self.infinite:
            raise TypeError("an endless search stream has no length")
        return len(self.sizes)

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = _worker()
        in_worker = get_worker_info() is not None
        cycle, skip = 0, 0
        if self.infinite and self.start_batch:
            if num_workers != 1:
                raise RuntimeError("an endless stream resumes at a batch only without loader workers")
            # whole passes cost nothing (each pass's order depends only on its index), the rest is
            # read and passed over: the stream continues exactly where it stopped
            cycle, skip = divmod(int(self.start_batch), len(self.sizes))
            self.start_batch = 0
        while True:
            for bx, by in self.iter_shard(self.epoch, worker, num_workers, cycle=cycle):
                if skip:
                    skip -= 1
                    continue
                # a view would ship its whole base storage (the split / the shuffle pool) to the main process
                if in_worker and bx._base is not None:
                    bx, by = bx.clone(), by.clone()
                yield bx, by
            if not self.infinite:
                return
            cycle += 1

    def iter_shard(
        self, epoch: int, worker: int = 0, num_workers: int = 1, cycle: int = 0
    ) -> Iterator[Batch]:
        """The batches of (this rank, ``worker`` of ``num_workers``) in ``epoch`` (pass ``cycle`` of
        an endless stream)."""
        for bx, by in self._batches(epoch, worker, num_workers, cycle):
            if self.interleave:  # this rank's slice of the global batch (empty only if < world rows)
                m = len(by)
                lo, hi = self.rank * m // self.world, (self.rank + 1) * m // self.world
                bx, by = bx[lo:hi], by[lo:hi]
            yield bx, by

    def _batches(self, epoch: int, worker: int, num_workers: int, cycle: int) -> Iterator[Batch]:
        """The plan's batches (global batches when interleaved) of ``worker`` in ``epoch``."""
        raise NotImplementedError


def _identity(batch: Batch) -> Batch:
    return batch


class BatchLoader(DataLoader):
    """``DataLoader(batch_size=None)`` over a batch-yielding dataset; ``epoch_fn()`` is read each
    time the loader is iterated and handed to the dataset before workers start."""

    def __init__(self, dataset: BatchDataset, epoch_fn: Callable[[], int] | None = None, **kwargs: Any):
        kwargs.setdefault("batch_size", None)
        kwargs.setdefault("collate_fn", _identity)
        # DataLoader.__iter__ draws a base seed from this generator -- by default the global torch RNG,
        # which the Gumbel masks and dropout also draw from: a loader iterated once more (a resumed
        # search re-opens its gate stream) would shift every later draw. The batch order never comes
        # from it (the datasets seed their own shuffles).
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(dataset, **kwargs)
        self.epoch_fn = epoch_fn

    def __iter__(self):
        if self.epoch_fn is not None:
            self.dataset.set_epoch(self.epoch_fn())
        return super().__iter__()

    def start_at(self, batches: int) -> None:
        """The next ``iter()`` of an endless stream starts after its first ``batches`` batches."""
        self.dataset.start_batch = int(batches)
