"""``IHASDataModule``: prepared Parquet splits -> whole batches ``(x int32 [B, F], y float32 [B])``.

Every stage of iHAS (the searching stage's bi-level model/gate steps, the clustering stage's pass over
the gate masks, the per-cluster retraining and the evaluation) reads its data through this module.

Batches are built whole, never row by row: the datasets are ``IterableDataset`` s that yield ready
``(x, y)`` tuples and are wrapped in ``DataLoader(batch_size=None)`` (as TorchRec does); there is no
per-row ``__getitem__`` + collate anywhere. Two modes:

``in_memory`` (:mod:`.in_memory`)
    each split is read once (row group by row group) into one contiguous ``int32 [N, F]`` tensor and
    a ``float32 [N]`` label tensor. Training batches gather the rows ``perm[i:i + B]`` (``np.take``)
    of a permutation seeded by ``(seed, epoch)``; evaluation batches are ordered slices.
``streaming`` (:mod:`.streaming`)
    the Parquet row groups are the shards; only a few of them are in memory at a time. For training
    the row-group order is permuted per epoch and rows are mixed in a shuffle buffer of
    ``shuffle_buffer_batches`` batches; evaluation reads in file order.
``device_resident`` (in_memory only; ``dataset.device_resident``, on by default when the trainer's
    accelerator is not the CPU) moves each split's arrays once to the training device; a training
    batch is then an ``index_select`` there by the epoch's permutation (drawn on the host as above, so
    the batch order is the host path's, and copied to the device once per epoch): no per-batch copy,
    no collate, no workers.
``auto`` (default) picks ``in_memory`` when all three splits (``rows * (F + 1) * 4`` bytes) fit in
``memory_budget_gb``, else ``streaming``.

Sharding (:mod:`.sharding`; the shared batch stream and its loader: :mod:`.batches`), training streams (the shuffled train loader and the gate's search stream): ``batch_size``
is the GLOBAL batch. Every rank follows the one-process stream (the same permutation, or the same
row-group order and shuffle buffer) and keeps its slice ``[r * m // W, (r + 1) * m // W)`` of each
global batch of ``m`` rows, so W ranks together train on exactly the batches one process trains on
(and the hyper-parameters do not change with W). A slice is empty only when a global batch has fewer
rows than ranks. The price in streaming mode: every rank reads every row group (and keeps 1/W of it).

Sharding, evaluation (and ``rank_plan``). An epoch has a *virtual row order*: file order. Rank ``r``
of ``W`` takes the contiguous range ``[r * N // W, (r + 1) * N // W)`` of it, so ranks differ by at
most one row, and EVERY rank yields the same number of batches ``ceil(ceil(N / W) / B)``: a rank
with fewer rows makes its last batch (rarely the last two) smaller, never empty. Equal counts keep
DDP's collectives in step; every row is yielded exactly once per epoch. Within a rank the batch
slots are split into contiguous blocks across the DataLoader workers (``get_worker_info()``), so the
per-rank batch count does not depend on ``num_workers``. With ``drop_last`` every rank instead
yields ``(N // W) // B`` full batches and the remainder is dropped. The rank and world size come
from ``torch.distributed`` when it is initialised, else the attached Trainer, else ``(0, 1)``; the
``rank`` / ``world_size`` arguments override all of these (tests simulate ranks with them).

Epochs: the train loader sets its dataset's epoch each time it is iterated, from the attached
Trainer's ``current_epoch`` or, standalone, from a counter (``set_epoch`` sets it). Workers are not
persistent, so the epoch reaches them.

``row_filter`` (per-cluster retraining): ``{split: bool mask | int index array}`` over that split's
rows in FILE order keeps only those rows, in file order (duplicate indices are ignored). It applies
to every reader of the split (loaders, :meth:`split_arrays`, :meth:`extra_column`); in streaming
mode each row group keeps the selected rows of its own row range.

Other readers: :meth:`search_dataloader` (an endless stream of shuffled batches of one split for the
gate step), :meth:`split_dataloader` (one pass in file order on this process: the cluster assignments are
computed in file order), :meth:`split_arrays`, :meth:`extra_column` (e.g. the synthetic
``_group``) and :meth:`positive_rate`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow.parquet as pq
import torch

from ..errors import ConfigError, DataError
from .batches import Batch, BatchDataset, BatchLoader, table_to_tensors
from .feature_map import FEATURE_MAP, LABEL, SPLITS, FeatureMap
from .in_memory import InMemoryBatches
from .streaming import StreamingBatches

MODES = ("auto", "in_memory", "streaming")
# stream ids keep the random streams of the loaders apart
TRAIN_STREAM, SEARCH_STREAM, SPLIT_STREAM = 1, 2, 3


class IHASDataModule(L.LightningDataModule):
    """Loaders over a prepared directory (train/val/test.parquet + feature_map.json)."""

    def __init__(
        self,
        prepared_dir: str | Path,
        batch_size: int = 2048,
        eval_batch_size: int | None = None,
        mode: str = "auto",
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer_batches: int = 8,
        search_batch_size: int | None = None,
        row_filter: Mapping[str, np.ndarray] | None = None,
        memory_budget_gb: float = 4.0,
        pin_memory: bool = False,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        device_resident: bool = False,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"IHASDataModule: mode must be one of {list(MODES)} (got '{mode}')")
        for name, v in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                        ("search_batch_size", search_batch_size)):  # fmt: skip
            if v is not None and int(v) < 1:
                raise ConfigError(f"IHASDataModule: {name} must be >= 1 (got {v})")
        if num_workers < 0 or shuffle_buffer_batches < 0:
            raise ConfigError("IHASDataModule: num_workers and shuffle_buffer_batches must be >= 0")
        self.prepared_dir = Path(prepared_dir)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size else 4 * self.batch_size
        self.search_batch_size = int(search_batch_size) if search_batch_size else self.batch_size
        self.requested_mode = mode
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.shuffle_buffer_batches = int(shuffle_buffer_batches)
        self.memory_budget_gb = float(memory_budget_gb)
        self.pin_memory = bool(pin_memory)
        self.drop_last = bool(drop_last)
        self.rank, self.world_size = rank, world_size
        # device_resident (in_memory mode): each split's arrays are moved once to ``device`` (default:
        # the attached Trainer's root device) and batches are sliced there: no per-batch host-to-device
        # copy and no collate. Ignored in streaming mode (the data does not fit in memory).
        self.device_resident = bool(device_resident)
        self.device = torch.device(device) if device is not None else None
        self._row_filter_arg = dict(row_filter) if row_filter else {}
        self._fm: FeatureMap | None = None
        self._mode: str | None = None
        self._keep: dict[str, np.ndarray | None] = {}
        self._rg_rows: dict[str, np.ndarray] = {}
        self._arrays: dict[str, Batch] = {}
        self._epoch = 0
        self._search_calls = 0

    # ---- metadata ------------------------------------------------------------------------------
    @property
    def feature_map(self) -> FeatureMap:
        if self._fm is None:
            self._fm = FeatureMap.load(self.prepared_dir)
        return self._fm

    @property
    def fields(self) -> list[str]:
        return self.feature_map.field_names

    @property
    def mode(self) -> str:
        """The resolved mode (``in_memory`` or ``streaming``)."""
        self._ensure()
        assert self._mode is not None
        return self._mode

    def split_path(self, split: str) -> Path:
        if split not in SPLITS:
            raise ConfigError(f"IHASDataModule: unknown split '{split}' (choose one of {list(SPLITS)})")
        return self.prepared_dir / str(self.feature_map.splits.get(split, {}).get("file", f"{split}.parquet"))

    def num_rows(self, split: str) -> int:
        """Rows of ``split`` after ``row_filter``."""
        self._ensure()
        keep = self._keep[split]
        return int(self._rg_rows[split].sum()) if keep is None else len(keep)

    def setup(self, stage: str | None = None) -> None:
        self._ensure()

    def _ensure(self) -> None:
        if self._mode is not None:
            return
        if not self.prepared_dir.is_dir():
            raise DataError(
                f"{self.prepared_dir}: prepared dataset directory does not exist (run stage=prepare)"
            )
        fm = self.feature_map
        unknown = set(self._row_filter_arg) - set(SPLITS)
        if unknown:
            raise ConfigError(f"IHASDataModule: row_filter has unknown split(s) {sorted(unknown)}")
        need = fm.field_names + [LABEL]
        total = 0
        for split in SPLITS:
            path = self.split_path(split)
            if not path.is_file():
                raise DataError(
                    f"{path}: missing split file; {self.prepared_dir} is not a complete prepared dir"
                )
            try:
                pf = pq.ParquetFile(path)
            except Exception as e:  # pyarrow raises several types for a corrupt file
                raise DataError(f"{path}: not a readable Parquet file ({e})") from e
            names = set(pf.schema_arrow.names)
            missing = [c for c in need if c not in names]
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {missing[:5]} ({FEATURE_MAP} lists {fm.num_fields} fields + '{LABEL}')"
                )
            md = pf.metadata
            rows = md.num_rows
            if split in fm.splits and "rows" in fm.splits[split] and fm.rows(split) != rows:
                raise DataError(f"{path}: {rows} rows but {FEATURE_MAP} says {fm.rows(split)}")
            self._rg_rows[split] = np.array(
                [md.row_group(i).num_rows for i in range(md.num_row_groups)], dtype=np.int64
            )
            self._keep[split] = self._resolve_filter(split, rows)
            total += rows
        est = total * (fm.num_fields + 1) * 4
        if self.requested_mode == "auto":
            self._mode = "in_memory" if est <= self.memory_budget_gb * 2**30 else "streaming"
        else:
            self._mode = self.requested_mode

    def _resolve_filter(self, split: str, rows: int) -> np.ndarray | None:
        if split not in self._row_filter_arg or self._row_filter_arg[split] is None:
            return None
        f = np.asarray(self._row_filter_arg[split])
        if f.dtype == np.bool_:
            if f.shape != (rows,):
                raise DataError(f"row_filter['{split}']: a bool mask needs shape ({rows},), got {f.shape}")
            return np.flatnonzero(f)
        if f.ndim != 1 or (f.size and not np.issubdtype(f.dtype, np.integer)):
            raise DataError(f"row_filter['{split}']: must be a 1-d bool mask or integer index array")
        keep = np.unique(f.astype(np.int64))
        if keep.size and (keep[0] < 0 or keep[-1] >= rows):
            raise DataError(
                f"row_filter['{split}']: indices must lie in [0, {rows}) (split rows in file order)"
            )
        return keep

    def _kept_per_row_group(self, split: str) -> list[np.ndarray] | None:
        keep = self._keep[split]
        if keep is None:
            return None
        off = np.concatenate([[0], np.cumsum(self._rg_rows[split])])
        cuts = np.searchsorted(keep, off)
        return [keep[cuts[i] : cuts[i + 1]] - off[i] for i in range(len(off) - 1)]

    # ---- whole-split readers ----------------------------------------------------------------------
    def _read_split(self, split: str) -> Batch:
        """Read a split (row_filter applied) into ``(x int32 [N, F], y float32 [N])``."""
        self._ensure()
        fields, kept = self.fields, self._kept_per_row_group(split)
        n = self.num_rows(split)
        x = torch.empty((n, len(fields)), dtype=torch.int32)
        y = torch.empty(n, dtype=torch.float32)
        pf = pq.ParquetFile(self.split_path(split))
        pos = 0
        for rg in range(pf.metadata.num_row_groups):
            if kept is not None and len(kept[rg]) == 0:
                continue
            table = pf.read_row_group(rg, columns=fields + [LABEL])
            if kept is not None:
                table = table.take(kept[rg])
            bx, by = table_to_tensors(table, fields)
            x[pos : pos + len(by)] = bx
            y[pos : pos + len(by)] = by
            pos += len(by)
        return x, y

    def split_arrays(self, split: str) -> Batch:
        """The whole split in memory (cached in in_memory mode): ``(x int32 [N, F], y float32 [N])``."""
        self._ensure()
        if split in self._arrays:
            return self._arrays[split]
        arrays = self._read_split(split)
        if self._mode == "in_memory":
            self._arrays[split] = arrays
        return arrays

    def data_device(self) -> torch.device:
        """Where device-resident splits live: ``device``, else the attached Trainer's root device."""
        if self.device is not None:
            return self.device
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    def device_arrays(self, split: str) -> Batch:
        """The split's arrays on :meth:`data_device` (moved once, cached per device)."""
        dev = self.data_device()
        key = f"{split}@{dev}"
        if key not in self._arrays:
            x, y = self.split_arrays(split)
            self._arrays[key] = (x.to(dev), y.to(dev)) if dev.type != "cpu" else (x, y)
        return self._arrays[key]

    def extra_column(self, split: str, name: str) -> np.ndarray:
        """A non-feature column (e.g. the synthetic ``_group``) in file order, row_filter applied."""
        self._ensure()
        path = self.split_path(split)
        if name not in pq.ParquetFile(path).schema_arrow.names:
            raise DataError(f"{path}: no column '{name}'")
        col = pq.read_table(path, columns=[name]).column(name).to_numpy()
        keep = self._keep[split]
        return col if keep is None else col[keep]

    def positive_rate(self, split: str) -> float | None:
        """Share of positive labels in ``split`` (row_filter applied); None for an empty split."""
        y = self.extra_column(split, LABEL)
        return float(np.mean(y)) if len(y) else None

    # ---- loaders -----------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None or self.world_size is not None:
            rank, world = int(self.rank or 0), int(self.world_size or 1)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        elif self.trainer is not None:
            rank, world = int(self.trainer.global_rank), int(self.trainer.world_size)
        else:
            rank, world = 0, 1
        if not 0 <= rank < world:
            raise ConfigError(f"IHASDataModule: rank {rank} is not in [0, world_size={world})")
        return rank, world

    def make_dataset(
        self,
        split: str,
        batch_size: int,
        shuffle: bool,
        stream: int,
        sharded: bool = True,
        drop_last: bool = False,
        infinite: bool = False,
        rank: int | None = None,
        world: int | None = None,
    ) -> BatchDataset:
        """The batch dataset of a split for (rank, world) (default: this process's; unsharded = 0, 1)."""
        self._ensure()
        if rank is None or world is None:
            rank, world = self._rank_world() if sharded else (0, 1)
        kw = dict(
            batch_size=batch_size, shuffle=shuffle, seed=self.seed, rank=rank, world=world,
            drop_last=drop_last, stream=stream, infinite=infinite, interleave=shuffle and sharded,
        )  # fmt: skip
        if self._mode == "in_memory":
            if self.device_resident:
                x, y = self.device_arrays(split)
                return InMemoryBatches(x, y, device_resident=True, **kw)
            x, y = self.split_arrays(split)
            return InMemoryBatches(x, y, **kw)
        return StreamingBatches(
            self.split_path(split),
            self.fields,
            self._rg_rows[split],
            self._kept_per_row_group(split),
            self.shuffle_buffer_batches,
            **kw,
        )

    def _loader(self, ds: BatchDataset, epoch_fn: Callable[[], int] | None, num_workers: int) -> BatchLoader:
        if getattr(ds, "device_resident", False):  # batches are device slices: no workers, nothing to pin
            return BatchLoader(ds, epoch_fn=epoch_fn, num_workers=0)
        return BatchLoader(ds, epoch_fn=epoch_fn, num_workers=num_workers, pin_memory=self.pin_memory)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next standalone train pass (ignored while a Trainer is fitting)."""
        self._epoch = int(epoch)

    def _train_epoch(self) -> int:
        trainer = self.trainer
        if trainer is not None:
            # the epochs the fit loop has processed: equal to current_epoch in a fresh fit, and right
            # also in the first epoch after resuming from a checkpoint written at an epoch's end (when
            # current_epoch still lags by one, so the shuffle would repeat the previous epoch's order)
            try:
                return int(trainer.fit_loop.epoch_progress.total.processed)
            except AttributeError:
                return int(trainer.current_epoch)
        e = self._epoch
        self._epoch += 1
        return e

    def train_dataloader(self) -> BatchLoader:
        ds = self.make_dataset("train", self.batch_size, True, TRAIN_STREAM, drop_last=self.drop_last)
        return self._loader(ds, self._train_epoch, self.num_workers)

    def val_dataloader(self) -> BatchLoader:
        return self._loader(self.make_dataset("val", self.eval_batch_size, False, 0), None, self.num_workers)

    def test_dataloader(self) -> BatchLoader:
        return self._loader(self.make_dataset("test", self.eval_batch_size, False, 0), None, self.num_workers)

    def search_dataloader(self, split: str = "val") -> BatchLoader:
        """Endless shuffled batches of ``search_batch_size`` from ``split`` (row_filter applied): the
        gate steps of the bi-level search (the VAL split in the paper's protocol; a held-out part of
        TRAIN with ``search.gate_data=holdout``).

        Sharded across ranks; each pass over this rank's rows is reshuffled, and each ``iter()`` of the
        loader starts a fresh random stream. Iterate it with ``next()``; it never ends."""
        ds = self.make_dataset(split, self.search_batch_size, True, SEARCH_STREAM, infinite=True)

        def next_call() -> int:
            self._search_calls += 1
            return self._search_calls - 1

        return self._loader(ds, next_call, 0)

    def split_dataloader(
        self, split: str, shuffle: bool = False, batch_size: int | None = None
    ) -> BatchLoader:
        """One pass over the whole split on THIS process (not sharded; no workers), in file order unless
        ``shuffle`` (row_filter applied). Batches default to ``eval_batch_size``."""
        ds = self.make_dataset(
            split, int(batch_size or self.eval_batch_size), shuffle, SPLIT_STREAM, sharded=False
        )
        calls = iter(range(2**62))
        return self._loader(ds, (lambda: next(calls)) if shuffle else None, 0)
