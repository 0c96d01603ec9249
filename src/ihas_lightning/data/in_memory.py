"""The in-memory data mode: batches sliced out of one contiguous tensor per split.

Each split is read once into ``int32 [N, F]`` / ``float32 [N]`` tensors (by the DataModule);
training batches gather the rows ``perm[i:i + B]`` of a permutation seeded by ``(seed, stream,
epoch)`` with numpy's single-threaded ``take``, evaluation batches are ordered slices. With
``device_resident`` the tensors already live on the training device and a batch is one
``index_select`` there by the host's permutation, so a GPU run sees the CPU run's batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .batches import Batch, BatchDataset, stream_seed
from .sharding import worker_plan


class InMemoryBatches(BatchDataset):
    """Batches sliced out of one contiguous ``int32 [N, F]`` tensor (see the module docstring)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, device_resident: bool = False, **kw: Any):
        """``device_resident``: ``x`` / ``y`` already live on the training device (or are used as if
        they did: the same code path on the CPU); batches are gathered there with torch ops."""
        super().__init__(n=len(y), **kw)
        self.x, self.y = x, y
        self.device_resident = bool(device_resident) or x.device.type != "cpu"

    def _batches(self, epoch: int, worker: int, num_workers: int, cycle: int) -> Iterator[Batch]:
        pos, sizes = worker_plan(self.start, self.sizes, worker, num_workers)
        x, y = self.x, self.y
        if not self.shuffle:
            for s in sizes.tolist():
                yield x[pos : pos + s], y[pos : pos + s]
                pos += s
            return
        order = np.random.default_rng(stream_seed(self.seed, self.stream, epoch, cycle)).permutation(self.n)
        if self.device_resident:
            # the split lives on the device: this worker's part of the permutation goes there once (the
            # host's order, so a GPU run sees the CPU run's batches); a batch is one index_select there
            perm = torch.from_numpy(order[pos : pos + int(sizes.sum())]).to(x.device)
            for idx in perm.split(sizes.tolist()):
                yield x.index_select(0, idx), y.index_select(0, idx)
        else:
            # numpy's single-threaded take: torch's index_select splits a 2048-row gather over the
            # intra-op threads and stalls badly when the cores are busy (10x slower under load)
            xn, yn = x.numpy(), y.numpy()
            for s in sizes.tolist():
                idx = order[pos : pos + s]
                pos += s
                yield torch.from_numpy(xn.take(idx, axis=0)), torch.from_numpy(yn.take(idx))
