"""The streaming data mode: batches read row group by row group from one Parquet split.

The split's row groups are the shards, so only a few of them are in memory at a time. For training
the row-group order is permuted per epoch and rows are mixed in a shuffle buffer of
``buffer_batches`` batches (:meth:`StreamingBatches._shuffled`); evaluation reads in file order,
joining the batches that straddle two row groups (:meth:`StreamingBatches._ordered`). A
``row_filter`` arrives as the kept local rows of each row group.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from .batches import Batch, BatchDataset, stream_seed, table_to_tensors
from .feature_map import LABEL
from .sharding import worker_plan


class StreamingBatches(BatchDataset):
    """Batches read row group by row group from one Parquet split (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        fields: list[str],
        rg_rows: np.ndarray,
        kept: list[np.ndarray] | None,
        buffer_batches: int,
        **kw: Any,
    ):
        self.path, self.fields = Path(path), list(fields)
        self.rg_rows = np.asarray(rg_rows, dtype=np.int64)
        self.kept = kept  # per row group: kept local row indices (row_filter), or None = all rows
        self.counts = self.rg_rows if kept is None else np.array([len(k) for k in kept], dtype=np.int64)
        self.buffer_batches = buffer_batches
        self._pf: pq.ParquetFile | None = None
        super().__init__(n=int(self.counts.sum()), **kw)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pf"] = None  # each worker opens its own file handle
        return state

    def row_group_order(self, epoch: int, cycle: int = 0) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.rg_rows))
        return np.random.default_rng(stream_seed(self.seed, self.stream, epoch, cycle)).permutation(
            len(self.rg_rows)
        )

    def pieces(self, epoch: int, start: int, stop: int, cycle: int = 0) -> list[tuple[int, int, int]]:
        """``(row group, lo, hi)``: the rows ``[start, stop)`` of the epoch's virtual order, where
        ``lo:hi`` index the kept rows of that row group."""
        order = self.row_group_order(epoch, cycle)
        cum = np.concatenate([[0], np.cumsum(self.counts[order])])
        out = []
        i = max(int(np.searchsorted(cum, start, side="right")) - 1, 0)
        while i < len(order) and cum[i] < stop:
            lo, hi = max(start - cum[i], 0), min(stop, cum[i + 1]) - cum[i]
            if hi > lo:
                out.append((int(order[i]), int(lo), int(hi)))
            i += 1
        return out

    def _read_table(self, rg: int, lo: int, hi: int) -> Any:
        if self._pf is None:
            self._pf = pq.ParquetFile(self.path)
        table = self._pf.read_row_group(rg, columns=self.fields + [LABEL])
        if self.kept is None:
            return table.slice(lo, hi - lo) if lo > 0 or hi < table.num_rows else table
        return table.take(self.kept[rg][lo:hi])

    def read_piece(self, rg: int, lo: int, hi: int) -> Batch:
        """The kept rows ``lo:hi`` of row group ``rg`` as fresh tensors."""
        return table_to_tensors(self._read_table(rg, lo, hi), self.fields)

    def _batches(self, epoch: int, worker: int, num_workers: int, cycle: int) -> Iterator[Batch]:
        pos, sizes = worker_plan(self.start, self.sizes, worker, num_workers)
        if len(sizes) == 0:
            return
        pieces = self.pieces(epoch, pos, pos + int(sizes.sum()), cycle)
        if self.shuffle:
            stream_rank = 0 if self.interleave else self.rank  # interleaved: every rank draws one stream
            yield from self._shuffled(
                pieces, sizes.tolist(), stream_seed(self.seed, self.stream, epoch, cycle, stream_rank, worker)
            )
        else:
            yield from self._ordered(pieces, sizes.tolist())

    def _ordered(self, pieces: list[tuple[int, int, int]], sizes: list[int]) -> Iterator[Batch]:
        """File order: slices of each freshly read piece; a batch straddling two pieces is joined."""
        k = 0
        carry: Batch | None = None
        for rg, lo, hi in pieces:
            cx, cy = self.read_piece(rg, lo, hi)
            i = 0
            if carry is not None:
                need = sizes[k] - len(carry[1])
                if need > len(cy):
                    carry = (torch.cat([carry[0], cx]), torch.cat([carry[1], cy]))
                    continue
                yield torch.cat([carry[0], cx[:need]]), torch.cat([carry[1], cy[:need]])
                carry, i, k = None, need, k + 1
            while k < len(sizes) and i + sizes[k] <= len(cy):
                yield cx[i : i + sizes[k]], cy[i : i + sizes[k]]
                i, k = i + sizes[k], k + 1
            if i < len(cy):
                carry = (cx[i:], cy[i:])
        if k != len(sizes) or carry is not None:  # pragma: no cover - the plan guarantees this
            raise RuntimeError(f"streaming shard of {self.path} does not match its batch plan")

    def _shuffled(self, pieces: list[tuple[int, int, int]], sizes: list[int], seed: int) -> Iterator[Batch]:
        """The shuffle buffer: each piece is read into one reused buffer behind the ``cap`` rows kept
        back from the previous pieces; a permutation of both yields the batches (fresh arrays, by
        ``np.take``) and leaves ``cap`` random rows behind to mix with the next piece."""
        rng = np.random.default_rng(seed)
        cap = self.buffer_batches * self.batch_size
        # kept-back rows: fewer than cap + one batch; then the widest piece
        room = cap + self.batch_size + max(hi - lo for _, lo, hi in pieces)
        bxn = np.empty((room, len(self.fields)), dtype=np.int32)
        byn = np.empty(room, dtype=np.float32)
        k, held = 0, 0
        for p_i, (rg, lo, hi) in enumerate(pieces):
            table = self._read_table(rg, lo, hi)
            m = table.num_rows
            for j, name in enumerate(self.fields):
                bxn[held : held + m, j] = table.column(name).to_numpy()
            byn[held : held + m] = table.column(LABEL).to_numpy()
            total = held + m
            perm = rng.permutation(total)
            keep_back = cap if p_i < len(pieces) - 1 else 0
            i = 0
            while k < len(sizes) and total - i - sizes[k] >= keep_back:
                idx = perm[i : i + sizes[k]]
                yield torch.from_numpy(bxn.take(idx, axis=0)), torch.from_numpy(byn.take(idx))
                i, k = i + sizes[k], k + 1
            rest = perm[i:]
            held = len(rest)
            if held:  # compact the kept-back rows to the front of the buffer
                bxn[:held] = bxn.take(rest, axis=0)
                byn[:held] = byn.take(rest)
        if k != len(sizes) or held:  # pragma: no cover - the plan guarantees this
            raise RuntimeError(f"streaming shard of {self.path} does not match its batch plan")
