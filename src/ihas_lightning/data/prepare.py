"""Raw Criteo / Avazu logs -> prepared Parquet splits + feature map (the paper's preprocessing).

The iHAS paper (like FuxiCTR / BARS) trains on Criteo and Avazu after a fixed preprocessing:
a random 80/10/10 split of the raw log, numeric Criteo fields discretized with
``floor(ln(x)^2)`` (``x > 2``; smaller integers stay themselves, missing is its own token), and a
per-field vocabulary built on the **training split only**, where tokens seen fewer than
``min_count`` times share the field's OOV id ``0``. This module implements it as a streaming,
two-pass job whose memory is bounded by the vocabulary, not by the number of rows:

* **tokens** (:mod:`.tokens`). Every raw cell becomes a 64-bit token key, vectorised over whole Arrow blocks:
  strings of up to 8 bytes are packed big-endian (so key order == byte order, and an empty cell is
  key 0); longer strings are hashed; numeric tokens map order-preservingly into ``uint64`` with
  key 0 reserved for "missing".
* **split** (:mod:`.splitting`). Each row's split comes from a counter-based hash (splitmix64) of
  ``(split_seed, global row index)``: deterministic and independent of block sizes, with no
  global shuffle.
* **pass 1** counts train tokens per field (:mod:`.vocab`): ``np.unique`` counts per block, merged into a sorted
  (key, count) table per field with geometric compaction.
* **vocabulary** (:mod:`.vocab`). Kept tokens get ids ``1..V-1`` by count descending, then token key ascending.
* **pass 2** re-reads the raw file(s), encodes (``pyarrow.compute.index_in`` against the kept keys,
  or a binary search for very large vocabularies) and writes ``train/val/test.parquet`` with one
  int32 column per field plus an int8 ``label``, in row groups of exactly ``row_group_size`` rows.
* **saved vocabulary** (:mod:`.vocab`). ``vocab.parquet`` keeps every field's kept token keys with their ids
  (:func:`save_vocab` / :func:`load_encoders`), so new raw rows can be encoded later (serving).

Reading (:mod:`.raw_io`, :mod:`.raw_format`, :mod:`.raw_blocks`). Avazu files carry a header line ``id,click,hour,...`` (any column order); a file whose first line
is a plain 24-field data row is read as headerless in the standard order (the public split samples
have no header in their dev/test files).

Malformed rows (ragged rows, non-integer I-cells, labels other than 0/1, bad ``hour``) raise one
:class:`~ihas_lightning.errors.DataError` naming the file and line, or are skipped and counted
with ``prepare.on_bad_rows=skip``. Output directory handling (atomic rename, hashes, reuse) lives
in :mod:`ihas_lightning.data.dataset_dir`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DataError
from .feature_map import LABEL, SPLITS, FeatureMap, Field
from .raw_blocks import BadRows, Block, iter_blocks
from .raw_format import RawFormat, make_format, sniff, transforms_record
from .splitting import assign_split
from .vocab import Encoder, TokenCounter, build_vocab, min_count_of, save_vocab

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
class SplitWriter:
    """Buffers encoded rows and writes row groups of exactly ``row_group_size`` rows (except the last)."""

    def __init__(self, path: Path, fields: list[str], row_group_size: int):
        self.path = path
        self.fields = fields
        self.rgs = int(row_group_size)
        self.schema = pa.schema([pa.field(n, pa.int32()) for n in fields] + [pa.field(LABEL, pa.int8())])
        self.writer = pq.ParquetWriter(str(path), self.schema, compression="snappy")
        self._buf: list[list[np.ndarray]] = [[] for _ in range(len(fields) + 1)]
        self._buffered = 0
        self.rows = 0
        self.positives = 0

    def add(self, cols: list[np.ndarray], label: np.ndarray) -> None:
        n = len(label)
        if n == 0:
            return
        for b, c in zip(self._buf, [*cols, label]):
            b.append(c)
        self._buffered += n
        self.rows += n
        self.positives += int(label.sum())
        if self._buffered >= self.rgs:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if self._buffered == 0:
            return
        merged = [np.concatenate(b) if len(b) > 1 else b[0] for b in self._buf]
        n_out = self._buffered if final else (self._buffered // self.rgs) * self.rgs
        if n_out:
            table = pa.Table.from_arrays([pa.array(m[:n_out]) for m in merged], schema=self.schema)
            self.writer.write_table(table, row_group_size=self.rgs)
        rest = self._buffered - n_out
        self._buf = [[m[n_out:]] if rest else [] for m in merged]
        self._buffered = rest

    def close(self) -> None:
        self._flush(final=True)
        self.writer.close()

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - best effort; the temp dir is removed anyway
            pass


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------
@dataclass
class PrepareOptions:
    on_bad_rows: str = "fail"
    block_size_mb: float = 16.0
    progress: bool = True

    @property
    def block_size(self) -> int:
        return max(1 << 16, int(float(self.block_size_mb) * (1 << 20)))


def rows_progress(enabled: bool):
    """A rich progress bar counting rows (rows/s, elapsed, remaining); off when ``enabled`` is false."""
    from rich.progress import (
        BarColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RowsPerSecond(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:,.0f} rows/s", style="progress.data.speed")

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f} rows"),
        RowsPerSecond(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


@dataclass
class _Job:
    """What both passes read: the raw files, each file's sniffed format, and the split rule."""

    files: Mapping[str, Path]
    base: RawFormat
    formats: dict[str, RawFormat]
    fractions: list[float]
    seed: int
    opts: PrepareOptions

    @property
    def single(self) -> bool:
        """One raw log split by :func:`assign_split` (else given train/val/test files)."""
        return "raw" in self.files

    @property
    def train_role(self) -> str:
        return "raw" if self.single else "train"

    def blocks(self, role: str, bad: BadRows) -> Iterator[Block]:
        f = self.formats[role]
        return iter_blocks(self.files[role], f, self.opts.block_size, self.opts.on_bad_rows, bad)


def _job(dcfg: Mapping[str, Any], files: Mapping[str, Path], opts: PrepareOptions) -> _Job:
    base = make_format(dcfg)
    formats = {role: sniff(p, base) for role, p in files.items()}
    fractions = [float(x) for x in dcfg.get("split", [0.8, 0.1, 0.1])]
    return _Job(files, base, formats, fractions, int(dcfg.get("split_seed", 0)), opts)


def _count_pass(job: _Job) -> tuple[list[TokenCounter], int]:
    """Pass 1: per-field counts of the training rows' tokens, and the rows read."""
    counters = [TokenCounter() for _ in range(len(job.base.fields))]
    role = job.train_role
    rows_seen = 0
    with rows_progress(job.opts.progress) as prog:
        task = prog.add_task(f"pass 1/2 count  {job.files[role].name}", total=None)
        for blk in job.blocks(role, BadRows()):
            if job.single:
                tr = assign_split(blk.row_index, job.seed, job.fractions) == 0
                for c, k in zip(counters, blk.keys):
                    c.add(k[tr])
            else:
                for c, k in zip(counters, blk.keys):
                    c.add(k)
            rows_seen += blk.n
            prog.update(task, advance=blk.n)
    return counters, rows_seen


def _encoders(
    dcfg: Mapping[str, Any], fields: list[str], counters: list[TokenCounter]
) -> tuple[list[Encoder], dict[str, int]]:
    """Each field's encoder (its vocabulary under ``min_count``) and its distinct train tokens."""
    encoders: list[Encoder] = []
    distinct: dict[str, int] = {}
    for name, c in zip(fields, counters):
        keys, counts = c.result()
        distinct[name] = len(keys)
        encoders.append(Encoder(build_vocab(keys, counts, min_count_of(dcfg.get("min_count", 1), name))))
    return encoders, distinct


def _encode_pass(
    job: _Job, encoders: list[Encoder], writers: dict[str, SplitWriter], rows_seen: int
) -> dict[str, BadRows]:
    """Pass 2: encode every file's rows and write them to their split; the bad rows of each file."""
    bad: dict[str, BadRows] = {}
    with rows_progress(job.opts.progress) as prog:
        order = ["raw"] if job.single else list(SPLITS)
        total = rows_seen if job.single else None
        for role in order:
            task = prog.add_task(f"pass 2/2 encode {job.files[role].name}", total=total)
            bad[role] = BadRows()
            for blk in job.blocks(role, bad[role]):
                ids = [enc(k) for enc, k in zip(encoders, blk.keys)]
                if job.single:
                    code = assign_split(blk.row_index, job.seed, job.fractions)
                    for si, s in enumerate(SPLITS):
                        m = code == si
                        writers[s].add([a[m] for a in ids], blk.label[m])
                else:
                    writers[role].add(ids, blk.label)
                prog.update(task, advance=blk.n)
    return bad


def _write_splits(
    job: _Job, encoders: list[Encoder], out_dir: Path, row_group_size: int, rows_seen: int
) -> tuple[dict[str, SplitWriter], dict[str, BadRows]]:
    """Pass 2 into ``{split}.parquet`` under ``out_dir``; every writer is aborted when it fails."""
    fields = job.base.fields
    writers = {s: SplitWriter(out_dir / f"{s}.parquet", fields, row_group_size) for s in SPLITS}
    try:
        bad = _encode_pass(job, encoders, writers, rows_seen)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return writers, bad


def _log_bad_rows(job: _Job, bad: dict[str, BadRows]) -> tuple[dict[str, int], dict[str, int]]:
    """Log the skipped blank and malformed rows; (malformed rows by file, blank lines by file)."""
    blank_by_file = {str(job.files[r]): b.blank for r, b in bad.items() if b.blank}
    for name, nb in blank_by_file.items():
        log.info("skipped %d blank line(s) in %s", nb, name)
    skipped_by_file = {str(job.files[r]): b.count for r, b in bad.items()}
    skipped = sum(skipped_by_file.values())
    if skipped:
        for r, b in bad.items():
            if b.count:
                line, rule = b.examples[0]
                log.warning(
                    "skipped %d malformed row(s) in %s (first at line %s: %s)",
                    b.count,
                    job.files[r],
                    line,
                    rule,
                )
    return skipped_by_file, blank_by_file


def _feature_map(
    dcfg: Mapping[str, Any],
    job: _Job,
    encoders: list[Encoder],
    writers: dict[str, SplitWriter],
    extra: dict[str, Any],
    config_hash: str,
    input_hash: str,
) -> FeatureMap:
    """The prepared dataset's feature map; ``extra``: the job's statistics after format/sources/split."""
    base = job.base
    return FeatureMap(
        dataset=str(dcfg.get("name", base.name)),
        fields=[
            Field(name=n, vocab_size=e.vocab_size, kind=base.kinds[n]) for n, e in zip(base.fields, encoders)
        ],
        min_count=_plain(dcfg.get("min_count", 1)),
        transforms=transforms_record(base),
        splits={
            s: {"rows": w.rows, "pos_rate": (w.positives / w.rows) if w.rows else 0.0, "file": f"{s}.parquet"}
            for s, w in writers.items()
        },
        row_group_size=int(dcfg["row_group_size"]),
        config_hash=config_hash,
        input_hash=input_hash,
        extra={
            "format": base.name,
            "sources": {r: str(p) for r, p in job.files.items()},
            "split": {"fractions": job.fractions, "seed": job.seed} if job.single else "explicit files",
            **extra,
        },
    )


def prepare_raw(
    dcfg: Mapping[str, Any],
    files: Mapping[str, Path],
    out_dir: Path,
    opts: PrepareOptions,
    config_hash: str = "",
    input_hash: str = "",
) -> FeatureMap:
    """Two-pass preparation of ``files`` ({'raw': p} or {'train','val','test'}) into ``out_dir``."""
    t0 = time.perf_counter()
    job = _job(dcfg, files, opts)
    fields = job.base.fields
    counters, rows_seen = _count_pass(job)
    t1 = time.perf_counter()
    encoders, distinct = _encoders(dcfg, fields, counters)
    del counters
    log.info(
        "pass 1: %d rows in %.1fs; %d distinct train tokens, %d kept (min_count=%s)",
        rows_seen, t1 - t0, sum(distinct.values()), sum(e.vocab_size - 1 for e in encoders), dcfg.get("min_count"),
    )  # fmt: skip
    writers, bad = _write_splits(job, encoders, out_dir, int(dcfg["row_group_size"]), rows_seen)
    t2 = time.perf_counter()
    skipped_by_file, blank_by_file = _log_bad_rows(job, bad)
    if writers["train"].rows == 0:
        raise DataError(f"{files[job.train_role]}: no valid training rows")
    total_rows = sum(w.rows for w in writers.values())
    stats = {
        "skipped_rows": sum(skipped_by_file.values()),
        "skipped_by_file": skipped_by_file,
        "blank_lines_by_file": blank_by_file,
        "distinct_train_tokens": distinct,
        "seconds": {"pass1": round(t1 - t0, 3), "pass2": round(t2 - t1, 3)},
        "rows_per_second": round(total_rows / max(t2 - t0, 1e-9), 1),
    }
    fm = _feature_map(dcfg, job, encoders, writers, stats, config_hash, input_hash)
    save_vocab(out_dir, fields, encoders)
    fm.save(out_dir)
    log.info(
        "prepared %s: train/val/test = %d/%d/%d rows, total vocab %d, %.1fs (%.0f rows/s)",
        fm.dataset, fm.rows("train"), fm.rows("val"), fm.rows("test"), sum(fm.vocab_sizes), t2 - t0,
        total_rows / max(t2 - t0, 1e-9),
    )  # fmt: skip
    return fm


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): int(v) for k, v in x.items()}
    return int(x)
