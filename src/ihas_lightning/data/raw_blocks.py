"""Raw rows -> validated blocks of token keys: the row checks, bad-row handling and tokenization.

:func:`iter_blocks` turns the parsed chunks of :func:`~ihas_lightning.data.raw_io.read_chunks` into
:class:`Block` s: token keys per output field (:mod:`.tokens`), labels, and each row's data-line
index (what :func:`~ihas_lightning.data.splitting.assign_split` hashes) and physical line. It
checks every row (field count, a label of exactly 0/1, integer cells, Avazu's ``YYMMDDHH`` hour
when derived) and either raises one :class:`~ihas_lightning.errors.DataError` naming the file and
first bad line (``on_bad_rows=fail``) or drops the row and counts it in :class:`BadRows`
(``skip``); blank lines are skipped and counted in every mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import DataError
from .raw_format import AVAZU_FIELDS, CRITEO_CAT, CRITEO_INT, RawFormat
from .raw_io import Chunk, read_chunks
from .tokens import log_square, numeric_keys, string_keys

BAD_ROW_MODES = ("fail", "skip")
_HINT = "(set prepare.on_bad_rows=skip to skip malformed rows)"

#: (bad-row mask, column, rule) of a failed check; the rule is formatted with the cell value
Check = tuple[np.ndarray, pa.Array, str]


@dataclass
class BadRows:
    """Malformed rows of one file (skip mode): count and the first few (line, rule)."""

    count: int = 0
    examples: list[tuple[int | None, str]] = field(default_factory=list)
    #: empty lines (a trailing newline, a blank line between rows): skipped in every mode, counted
    blank: int = 0

    def add(self, n: int, line: int | None, rule: str) -> None:
        self.count += n
        if len(self.examples) < 5:
            self.examples.append((line, rule))


@dataclass
class Block:
    """One block of valid rows: token keys per output field, labels, global row indices."""

    keys: list[np.ndarray]
    label: np.ndarray  # int8 (-1: a file without labels)
    row_index: np.ndarray  # int64, the row's data-line index in its file (line - 1 - header): a skipped
    # row (blank or malformed) changes no other row's index, so no other row's split
    extra: dict[str, pa.Array] = field(default_factory=dict)  # the format's passthrough columns
    line: np.ndarray | None = None  # int64, the row's physical line in its file (1-based)

    @property
    def n(self) -> int:
        return len(self.label)


_K0 = np.uint64(ord("0") << 56)
_K1 = np.uint64(ord("1") << 56)


def _cell(col: pa.Array, i: int) -> str:
    v = col[i].as_py()
    return "" if v is None else str(v)


def _ragged_error(path: Path, f: RawFormat, rows: list[tuple[int, int, str]]) -> DataError:
    """The error for the first of ``rows`` (file line, fields found, text) with the wrong field count."""
    line, got, text = min(rows)
    hint = ""
    if f.name == "criteo" and got == 1 and "," in text:
        hint = " (the row looks comma-separated; Criteo raw files are tab-separated)"
    sep_name = "tab" if f.delimiter == "\t" else "comma"
    return DataError(
        f"{path}:{line}: expected {len(f.columns)} {sep_name}-separated fields, got {got}{hint} {_HINT}"
    )


def _physical_lines(chunk: Chunk) -> np.ndarray:
    """The file line of each parsed row: the parser dropped the ragged lines (blank ones included)."""
    lines = chunk.first_line + np.arange(chunk.table.num_rows, dtype=np.int64)
    for r_line in sorted(r[0] for r in chunk.ragged):
        lines[lines >= r_line] += 1
    return lines


def _ragged_rows(f: RawFormat, chunk: Chunk, on_bad_rows: str, bad: BadRows) -> list[tuple[int, int, str]]:
    """The chunk's ragged rows that are not blank (blank ones are counted in ``bad.blank``); in skip
    mode each is counted as a bad row."""
    ragged = chunk.ragged
    blank = [r for r in ragged if not r[2].strip()]
    if blank:
        bad.blank += len(blank)
        ragged = [r for r in ragged if r[2].strip()]
    if ragged and on_bad_rows == "skip":
        for line, got, _ in ragged:
            bad.add(1, line, f"expected {len(f.columns)} fields, got {got}")
    return ragged


def _drop_empty_rows(
    cols: dict[str, pa.Array], lines: np.ndarray, bad: BadRows
) -> tuple[dict[str, pa.Array], np.ndarray]:
    """An empty line parses as a row of nulls: skipped and counted, never an error."""
    empty = np.logical_and.reduce([np.asarray(c.is_null()) for c in cols.values()])
    if not empty.any():
        return cols, lines
    bad.blank += int(empty.sum())
    keep_rows = pa.array(~empty)
    return {name: pc.filter(c, keep_rows) for name, c in cols.items()}, lines[~empty]


def _label_keys(f: RawFormat, cols: dict[str, pa.Array], n: int, checks: list[Check]) -> np.ndarray:
    """The label cells' keys (checked: exactly "0" or "1"); all "0" for a file without labels."""
    if not f.has_label:
        return np.full(n, _K0, dtype=np.uint64)
    lab_col = cols[f.label]
    lk = string_keys(lab_col)
    checks.append(
        ((lk != _K0) & (lk != _K1), lab_col, f"column {f.label} (the label) must be 0 or 1, got '{{}}'")
    )
    return lk


def _int_values(name: str, col: pa.Array, checks: list[Check]) -> tuple[np.ndarray, np.ndarray | None]:
    """An integer column: (values with 0 for missing, missing mask or None); bad cells are checked."""
    try:
        iv = pc.cast(col, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        ok = pc.fill_null(pc.match_substring_regex(col, r"^[+-]?[0-9]{1,18}$"), True)
        badi = ~np.asarray(ok, dtype=bool)
        checks.append((badi, col, f"column {name} must be an integer or empty, got '{{}}'"))
        iv = pc.cast(pc.if_else(pa.array(badi), pa.scalar(None, pa.string()), col), pa.int64())
    miss = np.asarray(iv.is_null()) if iv.null_count else None
    vals = np.asarray(iv.fill_null(0) if iv.null_count else iv, dtype=np.int64)
    return vals, miss


def _field_keys(
    f: RawFormat,
    cols: dict[str, pa.Array],
    ints: dict[str, tuple[np.ndarray, np.ndarray | None]],
    checks: list[Check],
) -> list[np.ndarray]:
    """The token keys of every output field, in the format's field order."""
    keys: list[np.ndarray] = []
    if f.name == "criteo":
        for name in CRITEO_INT:
            vals, miss = ints[name]
            tok = log_square(vals) if f.numeric_transform == "log_square" else vals
            keys.append(numeric_keys(tok, miss))
        for name in CRITEO_CAT:
            keys.append(string_keys(cols[name]))
        return keys
    for name in AVAZU_FIELDS:
        if name == "hour" and f.hour_transform == "derive":
            hod, wd, badh = _derive_hour(*ints["hour"])
            hcol = cols["hour"]
            checks.append((badh, hcol, "hour must be YYMMDDHH, got '{}'"))
            keys.append(numeric_keys(hod, None))
            keys.append(numeric_keys(wd, None))
        else:
            keys.append(string_keys(cols[name]))
    return keys


def _bad_row_mask(
    path: Path,
    f: RawFormat,
    checks: list[Check],
    ragged: list[tuple[int, int, str]],
    lines: np.ndarray,
    on_bad_rows: str,
    bad: BadRows,
) -> np.ndarray | None:
    """The rows failing a check (``None``: none). Fail mode raises for the first bad line (a ragged row
    before it first); skip mode counts them in ``bad``, with the first one's rule."""
    checks = [c for c in checks if c[0].any()]
    if not checks:
        return None
    firsts = [int(np.argmax(m)) for m, _, _ in checks]
    k = int(np.argmin(firsts))
    i, rule = firsts[k], checks[k][2].format(_cell(checks[k][1], firsts[k]))
    bad_mask = np.logical_or.reduce([m for m, _, _ in checks])
    line = int(lines[i])
    if on_bad_rows == "fail":
        if ragged and min(ragged)[0] < line:
            raise _ragged_error(path, f, ragged)
        raise DataError(f"{path}:{line}: {rule} {_HINT}")
    bad.add(int(bad_mask.sum()), line, rule)
    return bad_mask


def _chunk_block(
    path: Path, f: RawFormat, chunk: Chunk, on_bad_rows: str, bad: BadRows
) -> tuple[Block | None, bool]:
    """The block of one chunk's valid rows (``None``: the chunk has no rows to check) and whether the
    chunk had ragged rows."""
    lines = _physical_lines(chunk)
    ragged = _ragged_rows(f, chunk, on_bad_rows, bad)
    n = chunk.table.num_rows
    if n:
        batch = chunk.table
        cols = {
            name: c.chunk(0) if c.num_chunks == 1 else pa.concat_arrays(c.chunks)
            for name, c in zip(batch.column_names, batch.columns)
        }
        cols, lines = _drop_empty_rows(cols, lines, bad)
        n = len(lines)
    if n == 0:
        if ragged and on_bad_rows == "fail":
            raise _ragged_error(path, f, ragged)
        return None, bool(ragged)
    checks: list[Check] = []
    lk = _label_keys(f, cols, n, checks)
    ints = {name: _int_values(name, cols[name], checks) for name in f.int_columns}
    keys = _field_keys(f, cols, ints, checks)
    row_index = lines - (2 if f.header else 1)
    bad_mask = _bad_row_mask(path, f, checks, ragged, lines, on_bad_rows, bad)
    if bad_mask is not None:
        keep = ~bad_mask
        keys = [k[keep] for k in keys]
        lk, row_index, lines = lk[keep], row_index[keep], lines[keep]
        extra = {c: pc.filter(cols[c], pa.array(keep)) for c in f.passthrough}
    else:
        extra = {c: cols[c] for c in f.passthrough}
    if ragged and on_bad_rows == "fail":
        raise _ragged_error(path, f, ragged)
    label = (lk == _K1).astype(np.int8) if f.has_label else np.full(len(lk), -1, dtype=np.int8)
    return Block(keys=keys, label=label, row_index=row_index, extra=extra, line=lines), bool(ragged)


def iter_blocks(path: Path, f: RawFormat, block_size: int, on_bad_rows: str, bad: BadRows) -> Iterator[Block]:
    """Stream ``path`` in blocks of ~``block_size`` bytes, validate, and yield token keys."""
    any_rows = False  # the parser yielded a row to check
    any_ragged = False
    for chunk in read_chunks(path, f, block_size):
        blk, ragged = _chunk_block(path, f, chunk, on_bad_rows, bad)
        any_ragged = any_ragged or ragged
        if blk is not None:
            any_rows = True
            yield blk
    if not any_rows and not any_ragged:
        raise DataError(f"{path}: no data rows" + (" after the header" if f.header else ""))


def _derive_hour(vals: np.ndarray, miss: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """YYMMDDHH -> (hour_of_day, weekday 0=Monday, bad-row mask)."""
    yy, mm = vals // 1_000_000, (vals // 10_000) % 100
    dd, hh = (vals // 100) % 100, vals % 100
    bad = (vals < 0) | (vals > 99_999_999) | (mm < 1) | (mm > 12) | (dd < 1) | (dd > 31) | (hh > 23)
    if miss is not None:
        bad |= miss
    y, m, d = np.where(bad, 0, yy) + 2000, np.where(bad, 1, mm), np.where(bad, 1, dd)
    months = (y - 1970) * 12 + (m - 1)
    date = months.astype("datetime64[M]").astype("datetime64[D]") + (d - 1).astype("timedelta64[D]")
    # a day beyond the month's end rolls into the next month: that is a bad date too
    bad |= (date.astype("datetime64[M]").astype(np.int64) != months) & ~bad
    days = date.astype(np.int64)
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday (3 with Monday=0)
    return hh.astype(np.int64), weekday.astype(np.int64), bad
