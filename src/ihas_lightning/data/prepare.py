"""Raw Criteo / Avazu logs -> prepared Parquet splits + feature map (the paper's preprocessing).

The iHAS paper (like FuxiCTR / BARS) trains on Criteo and Avazu after a fixed preprocessing:
a random 80/10/10 split of the raw log, numeric Criteo fields discretized with
``floor(ln(x)^2)`` (``x > 2``; smaller integers stay themselves, missing is its own token), and a
per-field vocabulary built on the **training split only**, where tokens seen fewer than
``min_count`` times share the field's OOV id ``0``. This module implements it as a streaming,
two-pass job whose memory is bounded by the vocabulary, not by the number of rows:

* **tokens.** Every raw cell becomes a 64-bit token key, vectorised over whole Arrow blocks:
  strings of up to 8 bytes are packed big-endian (so key order == byte order, and an empty cell is
  key 0); longer strings are hashed; numeric tokens map order-preservingly into ``uint64`` with
  key 0 reserved for "missing".
* **split.** Each row's split comes from a counter-based hash (splitmix64) of
  ``(split_seed, global row index)``: deterministic and independent of block sizes, with no
  global shuffle.
* **pass 1** counts train tokens per field: ``np.unique`` counts per block, merged into a sorted
  (key, count) table per field with geometric compaction.
* **vocabulary.** Kept tokens get ids ``1..V-1`` by count descending, then token key ascending.
* **pass 2** re-reads the raw file(s), encodes (``pyarrow.compute.index_in`` against the kept keys,
  or a binary search for very large vocabularies) and writes ``train/val/test.parquet`` with one
  int32 column per field plus an int8 ``label``, in row groups of exactly ``row_group_size`` rows.
* **saved vocabulary.** ``vocab.parquet`` keeps every field's kept token keys with their ids
  (:func:`save_vocab` / :func:`load_encoders`), so new raw rows can be encoded later (serving).

Avazu files carry a header line ``id,click,hour,...`` (any column order); a file whose first line
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import DataError
from .feature_map import LABEL, SPLITS, FeatureMap, Field

log = logging.getLogger(__name__)

CRITEO_INT = [f"I{i}" for i in range(1, 14)]
CRITEO_CAT = [f"C{i}" for i in range(1, 27)]
CRITEO_COLUMNS = ["label", *CRITEO_INT, *CRITEO_CAT]
AVAZU_COLUMNS = [
    "id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
    "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
    "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
]  # fmt: skip
AVAZU_FIELDS = AVAZU_COLUMNS[2:]  # `id` is dropped, `click` is the label

NUMERIC_TRANSFORMS = ("log_square", "raw")
HOUR_TRANSFORMS = ("raw", "derive")
BAD_ROW_MODES = ("fail", "skip")

# vocabularies larger than this are looked up by binary search instead of a per-block hash set
_INDEX_IN_MAX_VOCAB = 1 << 20
_MISSING_KEY = np.uint64(0)
_SIGN = np.uint64(1 << 63)
_HINT = "(set prepare.on_bad_rows=skip to skip malformed rows)"


# ---------------------------------------------------------------------------------------------
# hashing, split
# ---------------------------------------------------------------------------------------------
def splitmix64(x: np.ndarray | int) -> np.ndarray:
    """The splitmix64 finaliser on uint64 (wrapping arithmetic): a counter-based hash."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def assign_split(row_index: np.ndarray, seed: int, fractions: Sequence[float]) -> np.ndarray:
    """Split code (0=train, 1=val, 2=test) of each global row index: a pure function of (seed, index)."""
    salt = splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
    h = splitmix64(np.asarray(row_index, dtype=np.uint64) ^ salt)
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    c0, c1 = float(fractions[0]), float(fractions[0]) + float(fractions[1])
    return np.where(u < c0, 0, np.where(u < c1, 1, 2)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# tokens
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------------
@dataclass
class RawFormat:
    """How to read one raw format and which fields it yields."""

    name: str
    delimiter: str
    header: bool
    columns: list[str]  # all columns of a row, in file order (Criteo: fixed; Avazu: from the header)
    label: str
    int_columns: list[str]  # validated as integers (read as strings, cast)
    fields: list[str]  # output fields, in order
    kinds: dict[str, str]
    numeric_transform: str = "log_square"
    hour_transform: str = "raw"
    has_label: bool = True  # False: new rows to score (stage=predict), the label column absent
    passthrough: tuple[str, ...] = ()  # columns read as they are and carried in Block.extra (e.g. id)

    @property
    def read_columns(self) -> list[str]:
        if self.name == "criteo":
            return list(self.columns)
        return [c for c in self.columns if c != "id" or "id" in self.passthrough]


def make_format(dcfg: Mapping[str, Any]) -> RawFormat:
    fmt = dcfg["format"]
    if fmt == "criteo":
        nt = dcfg.get("numeric_transform", "log_square") or "log_square"
        kinds = {**dict.fromkeys(CRITEO_INT, "numeric"), **dict.fromkeys(CRITEO_CAT, "categorical")}
        return RawFormat("criteo", "\t", False, list(CRITEO_COLUMNS), "label", list(CRITEO_INT),
                         CRITEO_INT + CRITEO_CAT, kinds, numeric_transform=nt)  # fmt: skip
    if fmt == "avazu":
        ht = dcfg.get("hour_transform", "raw") or "raw"
        fields = list(AVAZU_FIELDS)
        int_cols: list[str] = []
        if ht == "derive":
            i = fields.index("hour")
            fields[i : i + 1] = ["hour_of_day", "weekday"]
            int_cols = ["hour"]
        kinds = dict.fromkeys(fields, "categorical")
        return RawFormat("avazu", ",", True, list(AVAZU_COLUMNS), "click", int_cols, fields, kinds,
                         hour_transform=ht)  # fmt: skip
    raise DataError(f"unknown raw format {fmt!r}")


def transforms_record(f: RawFormat) -> dict[str, Any]:
    if f.name == "criteo":
        rule = (
            "floor(ln(x)^2) if x > 2 else x; missing is its own token"
            if f.numeric_transform == "log_square"
            else "the integer itself; missing is its own token"
        )
        return {"numeric": {"fields": list(CRITEO_INT), "transform": f.numeric_transform, "rule": rule},
                "categorical": {"fields": list(CRITEO_CAT), "missing": "empty cell is its own token"}}  # fmt: skip
    rec: dict[str, Any] = {"dropped": ["id"], "label": "click", "hour": f.hour_transform}
    if f.hour_transform == "derive":
        rec["hour_derived"] = {"hour_of_day": "HH of YYMMDDHH", "weekday": "0=Monday..6=Sunday of 20YY-MM-DD"}
    return rec


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def open_raw(path: Path) -> pa.NativeFile:
    """Input stream over a plain or gzip file (gzip detected from its magic bytes)."""
    try:
        comp = "gzip" if _is_gzip(path) else None
        return pa.input_stream(str(path), compression=comp, buffer_size=1 << 20)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({_one_line(e)})") from e


_BOM = b"\xef\xbb\xbf"


def _last_good_line(path: Path) -> int:
    """Complete lines readable before a (truncated or corrupt) compressed stream fails."""
    import gzip

    n = 0
    try:
        with gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb") as fh:
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break
                n += 1
    except (OSError, EOFError):
        pass
    return n


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def check_path(path: str | Path, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file (given as {key})")
    if not p.is_file():
        raise DataError(f"{p}: not a regular file (given as {key})")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as e:
        raise DataError(f"{p}: cannot read ({_one_line(e)}) (given as {key})") from e
    return p


def _first_line(path: Path) -> str:
    with open_raw(path) as s:
        try:
            head = s.read(1 << 16)
        except OSError as e:
            raise DataError(f"{path}: cannot read ({_one_line(e)})") from e
    if not head.strip():
        raise DataError(f"{path}: empty file (no rows)")
    if head.startswith(_BOM):
        head = head[len(_BOM) :]
    return head.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")


def sniff(path: Path, f: RawFormat, label_optional: bool = False) -> RawFormat:
    """Check the first line (separator, Avazu header) and return the format with its file columns.
    ``label_optional`` (new rows to score): a file without the label column is accepted."""
    line = _first_line(path)
    if f.name == "criteo":
        n = line.count("\t") + 1
        if label_optional and n == len(CRITEO_COLUMNS) - 1:
            return RawFormat(**{**f.__dict__, "columns": CRITEO_COLUMNS[1:], "has_label": False})
        if n != len(CRITEO_COLUMNS):
            hint = ""
            if line.count(",") + 1 >= len(CRITEO_COLUMNS) - 1:
                hint = " (the file looks comma-separated; Criteo raw files are tab-separated)"
            raise DataError(
                f"{path}:1: expected {len(CRITEO_COLUMNS)} tab-separated fields "
                f"(label, I1..I13, C1..C26), got {n}{hint}"
            )
        return f
    header = [h.strip() for h in line.split(",")]
    if not set(header) & set(AVAZU_COLUMNS) and len(header) == len(AVAZU_COLUMNS) and header[1] in ("0", "1"):
        # a headerless split file (e.g. the Lapis-Hong dev/test files): the standard column order
        return RawFormat(**{**f.__dict__, "header": False})
    missing = [c for c in AVAZU_COLUMNS if c not in header]
    if label_optional and "click" in missing:  # the Kaggle test file: no click column
        missing.remove("click")
        f = RawFormat(**{**f.__dict__, "has_label": False})
    hint = " (the file looks tab-separated; Avazu raw files are comma-separated)" if "\t" in line else ""
    if len(missing) == len(AVAZU_COLUMNS):
        raise DataError(
            f"{path}:1: expected an Avazu header line '{','.join(AVAZU_COLUMNS[:4])},...,C21' or "
            f"{len(AVAZU_COLUMNS)} comma-separated fields, got {len(header)} field(s){hint}"
        )
    if missing:
        raise DataError(
            f"{path}:1: Avazu header is missing column(s) {','.join(missing)}; expected a header line "
            f"'{','.join(AVAZU_COLUMNS[:4])},...,C21'{hint}"
        )
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        raise DataError(f"{path}:1: Avazu header repeats column(s) {','.join(dup)}")
    return RawFormat(**{**f.__dict__, "columns": header})


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


@dataclass
class _Chunk:
    table: pa.Table
    first_line: int  # 1-based file line of the chunk's first line
    ragged: list[tuple[int, int, str]]  # (file line, fields found, text) of rows the parser dropped


def _read_chunks(path: Path, f: RawFormat, block_size: int) -> Iterator[_Chunk]:
    """Cut the (decompressed) file at line ends into ~block_size chunks and parse each one.

    Reading + decompressing + parsing the next chunk runs in a helper thread while the caller
    processes the current one (pyarrow releases the GIL), so memory stays at ~2 chunks and the
    two cores overlap. Each chunk knows its first line number, so errors name exact lines."""
    read_cols = f.read_columns
    copts = pacsv.ConvertOptions(
        include_columns=read_cols,
        column_types=dict.fromkeys(read_cols, pa.string()),
        strings_can_be_null=True,
        null_values=[""],
        quoted_strings_can_be_null=False,
    )

    def parse(data: bytes, first_line: int) -> _Chunk:
        ragged: list[tuple[int, int, str]] = []

        def on_invalid(row: Any) -> str:
            # always skip here; the caller decides (fail mode raises for the first offending line)
            num = first_line + row.number - 1 if row.number is not None else -1
            ragged.append((num, row.actual_columns, row.text or ""))
            return "skip"

        ropts = pacsv.ReadOptions(column_names=f.columns, block_size=len(data) + 1, use_threads=False)
        popts = pacsv.ParseOptions(
            delimiter=f.delimiter, quote_char=False, ignore_empty_lines=False, invalid_row_handler=on_invalid
        )
        try:
            table = pacsv.read_csv(
                pa.BufferReader(data), read_options=ropts, parse_options=popts, convert_options=copts
            )
        except (pa.ArrowInvalid, OSError) as e:
            last = first_line + data.count(b"\n") - 1
            raise DataError(f"{path}: cannot parse lines {first_line}..{last} ({_one_line(e)})") from e
        return _Chunk(table, first_line, ragged)

    def produce(stream: pa.NativeFile, state: dict[str, Any]) -> _Chunk | None:
        carry: bytes = state["carry"]
        while True:
            try:
                buf = stream.read(block_size)
            except OSError as e:
                good = _last_good_line(path)
                where = (
                    f"after line {good}, the last complete one" if good else "before its first complete line"
                )
                raise DataError(f"{path}: cannot read {where} ({_one_line(e)})") from e
            if state["bom"]:
                state["bom"] = False
                if buf.startswith(_BOM):  # a UTF-8 byte-order mark (spreadsheet exports)
                    buf = buf[len(_BOM) :]
            if not buf:
                if not carry:
                    return None
                data, carry = (carry if carry.endswith(b"\n") else carry + b"\n"), b""
                break
            data = carry + buf if carry else buf
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                continue
            data, carry = data[: cut + 1], data[cut + 1 :]
            break
        state["carry"] = carry
        if state["skip_header"]:
            state["skip_header"] = False
            nl = data.find(b"\n")
            data = data[nl + 1 :]
            state["line"] += 1
            if not data:
                return produce(stream, state)
        first = state["line"]
        state["line"] += data.count(b"\n")
        return parse(data, first)

    from concurrent.futures import ThreadPoolExecutor

    stream = open_raw(path)
    state: dict[str, Any] = {"carry": b"", "line": 1, "skip_header": f.header, "bom": True}
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ihas-csv") as pool:
            fut = pool.submit(produce, stream, state)
            while True:
                chunk = fut.result()
                if chunk is None:
                    return
                fut = pool.submit(produce, stream, state)
                yield chunk
    finally:
        stream.close()


def iter_blocks(path: Path, f: RawFormat, block_size: int, on_bad_rows: str, bad: BadRows) -> Iterator[Block]:
    """Stream ``path`` in blocks of ~``block_size`` bytes, validate, and yield token keys."""
    sep_name = "tab" if f.delimiter == "\t" else "comma"

    def ragged_error(rows: list[tuple[int, int, str]]) -> DataError:
        line, got, text = min(rows)
        hint = ""
        if f.name == "criteo" and got == 1 and "," in text:
            hint = " (the row looks comma-separated; Criteo raw files are tab-separated)"
        return DataError(
            f"{path}:{line}: expected {len(f.columns)} {sep_name}-separated fields, got {got}{hint} {_HINT}"
        )

    seen = 0  # rows the parser yielded so far
    any_ragged = False
    for chunk in _read_chunks(path, f, block_size):
        batch, ragged = chunk.table, chunk.ragged
        # physical line of each parsed row: the parser dropped the ragged lines (blank ones included)
        lines = chunk.first_line + np.arange(batch.num_rows, dtype=np.int64)
        for r_line in sorted(r[0] for r in ragged):
            lines[lines >= r_line] += 1
        blank = [r for r in ragged if not r[2].strip()]
        if blank:
            bad.blank += len(blank)
            ragged = [r for r in ragged if r[2].strip()]
        if ragged:
            any_ragged = True
            if on_bad_rows == "skip":
                for line, got, _ in ragged:
                    bad.add(1, line, f"expected {len(f.columns)} fields, got {got}")
        n = batch.num_rows
        if n == 0:
            if ragged and on_bad_rows == "fail":
                raise ragged_error(ragged)
            continue
        cols = {
            name: c.chunk(0) if c.num_chunks == 1 else pa.concat_arrays(c.chunks)
            for name, c in zip(batch.column_names, batch.columns)
        }
        # an empty line parses as a row of nulls: skipped and counted, never an error
        empty = np.logical_and.reduce([np.asarray(c.is_null()) for c in cols.values()])
        if empty.any():
            bad.blank += int(empty.sum())
            keep_rows = pa.array(~empty)
            cols = {name: pc.filter(c, keep_rows) for name, c in cols.items()}
            lines = lines[~empty]
            n = len(lines)
            if n == 0:
                if ragged and on_bad_rows == "fail":
                    raise ragged_error(ragged)
                continue
        # (bad-row mask, column, rule) of each failed check; the rule is formatted with the cell value
        checks: list[tuple[np.ndarray, pa.Array, str]] = []
        # label: exactly "0" or "1"
        if f.has_label:
            lab_col = cols[f.label]
            lk = string_keys(lab_col)
            checks.append(
                (
                    (lk != _K0) & (lk != _K1),
                    lab_col,
                    f"column {f.label} (the label) must be 0 or 1, got '{{}}'",
                )
            )
        else:
            lk = np.full(n, _K0, dtype=np.uint64)
        # integer columns
        ints: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for name in f.int_columns:
            col = cols[name]
            try:
                iv = pc.cast(col, pa.int64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                ok = pc.fill_null(pc.match_substring_regex(col, r"^[+-]?[0-9]{1,18}$"), True)
                badi = ~np.asarray(ok, dtype=bool)
                checks.append((badi, col, f"column {name} must be an integer or empty, got '{{}}'"))
                iv = pc.cast(pc.if_else(pa.array(badi), pa.scalar(None, pa.string()), col), pa.int64())
            miss = np.asarray(iv.is_null()) if iv.null_count else None
            vals = np.asarray(iv.fill_null(0) if iv.null_count else iv, dtype=np.int64)
            ints[name] = (vals, miss)
        keys: list[np.ndarray] = []
        if f.name == "criteo":
            for name in CRITEO_INT:
                vals, miss = ints[name]
                tok = log_square(vals) if f.numeric_transform == "log_square" else vals
                keys.append(numeric_keys(tok, miss))
            for name in CRITEO_CAT:
                keys.append(string_keys(cols[name]))
        else:
            for name in AVAZU_FIELDS:
                if name == "hour" and f.hour_transform == "derive":
                    hod, wd, badh = _derive_hour(*ints["hour"])
                    hcol = cols["hour"]
                    checks.append((badh, hcol, "hour must be YYMMDDHH, got '{}'"))
                    keys.append(numeric_keys(hod, None))
                    keys.append(numeric_keys(wd, None))
                else:
                    keys.append(string_keys(cols[name]))
        row_index = lines - (2 if f.header else 1)
        checks = [c for c in checks if c[0].any()]
        if checks:
            firsts = [int(np.argmax(m)) for m, _, _ in checks]
            k = int(np.argmin(firsts))
            i, rule = firsts[k], checks[k][2].format(_cell(checks[k][1], firsts[k]))
            bad_mask = np.logical_or.reduce([m for m, _, _ in checks])
            line = int(lines[i])
            if on_bad_rows == "fail":
                if ragged and min(ragged)[0] < line:
                    raise ragged_error(ragged)
                raise DataError(f"{path}:{line}: {rule} {_HINT}")
            bad.add(int(bad_mask.sum()), line, rule)
            keep = ~bad_mask
            keys = [k[keep] for k in keys]
            lk, row_index, lines = lk[keep], row_index[keep], lines[keep]
            extra = {c: pc.filter(cols[c], pa.array(keep)) for c in f.passthrough}
        else:
            extra = {c: cols[c] for c in f.passthrough}
        if ragged and on_bad_rows == "fail":
            raise ragged_error(ragged)
        seen += n
        label = (lk == _K1).astype(np.int8) if f.has_label else np.full(len(lk), -1, dtype=np.int8)
        yield Block(keys=keys, label=label, row_index=row_index, extra=extra, line=lines)
    if seen == 0 and not any_ragged:
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


# ---------------------------------------------------------------------------------------------
# vocabulary
# ---------------------------------------------------------------------------------------------
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
    base = make_format(dcfg)
    formats = {role: sniff(p, base) for role, p in files.items()}
    single = "raw" in files
    fractions = [float(x) for x in dcfg.get("split", [0.8, 0.1, 0.1])]
    seed = int(dcfg.get("split_seed", 0))
    fields = base.fields
    nf = len(fields)
    bs = opts.block_size
    bad_pass1: dict[str, BadRows] = {}
    bad_pass2: dict[str, BadRows] = {}

    # ---- pass 1: count train tokens -----------------------------------------------------------
    counters = [TokenCounter() for _ in range(nf)]
    train_role = "raw" if single else "train"
    rows_seen = 0
    with rows_progress(opts.progress) as prog:
        task = prog.add_task(f"pass 1/2 count  {files[train_role].name}", total=None)
        bad_pass1[train_role] = BadRows()
        for blk in iter_blocks(
            files[train_role], formats[train_role], bs, opts.on_bad_rows, bad_pass1[train_role]
        ):
            if single:
                tr = assign_split(blk.row_index, seed, fractions) == 0
                for c, k in zip(counters, blk.keys):
                    c.add(k[tr])
            else:
                for c, k in zip(counters, blk.keys):
                    c.add(k)
            rows_seen += blk.n
            prog.update(task, advance=blk.n)
    t1 = time.perf_counter()
    encoders: list[Encoder] = []
    distinct: dict[str, int] = {}
    for name, c in zip(fields, counters):
        keys, counts = c.result()
        distinct[name] = len(keys)
        encoders.append(Encoder(build_vocab(keys, counts, min_count_of(dcfg.get("min_count", 1), name))))
    del counters
    log.info(
        "pass 1: %d rows in %.1fs; %d distinct train tokens, %d kept (min_count=%s)",
        rows_seen, t1 - t0, sum(distinct.values()), sum(e.vocab_size - 1 for e in encoders), dcfg.get("min_count"),
    )  # fmt: skip

    # ---- pass 2: encode + write -----------------------------------------------------------------
    writers = {s: SplitWriter(out_dir / f"{s}.parquet", fields, int(dcfg["row_group_size"])) for s in SPLITS}
    try:
        with rows_progress(opts.progress) as prog:
            order = ["raw"] if single else list(SPLITS)
            total = rows_seen if single else None
            for role in order:
                task = prog.add_task(f"pass 2/2 encode {files[role].name}", total=total)
                bad_pass2[role] = BadRows()
                for blk in iter_blocks(files[role], formats[role], bs, opts.on_bad_rows, bad_pass2[role]):
                    ids = [enc(k) for enc, k in zip(encoders, blk.keys)]
                    if single:
                        code = assign_split(blk.row_index, seed, fractions)
                        for si, s in enumerate(SPLITS):
                            m = code == si
                            writers[s].add([a[m] for a in ids], blk.label[m])
                    else:
                        writers[role].add(ids, blk.label)
                    prog.update(task, advance=blk.n)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    t2 = time.perf_counter()

    blank_by_file = {str(files[r]): b.blank for r, b in bad_pass2.items() if b.blank}
    for name, nb in blank_by_file.items():
        log.info("skipped %d blank line(s) in %s", nb, name)
    skipped_by_file = {str(files[r]): b.count for r, b in bad_pass2.items()}
    skipped = sum(skipped_by_file.values())
    if skipped:
        for r, b in bad_pass2.items():
            if b.count:
                line, rule = b.examples[0]
                log.warning(
                    "skipped %d malformed row(s) in %s (first at line %s: %s)", b.count, files[r], line, rule
                )
    if writers["train"].rows == 0:
        raise DataError(f"{files[train_role]}: no valid training rows")
    total_rows = sum(w.rows for w in writers.values())
    fm = FeatureMap(
        dataset=str(dcfg.get("name", base.name)),
        fields=[Field(name=n, vocab_size=e.vocab_size, kind=base.kinds[n]) for n, e in zip(fields, encoders)],
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
            "sources": {r: str(p) for r, p in files.items()},
            "split": {"fractions": fractions, "seed": seed} if single else "explicit files",
            "skipped_rows": skipped,
            "skipped_by_file": skipped_by_file,
            "blank_lines_by_file": blank_by_file,
            "distinct_train_tokens": distinct,
            "seconds": {"pass1": round(t1 - t0, 3), "pass2": round(t2 - t1, 3)},
            "rows_per_second": round(total_rows / max(t2 - t0, 1e-9), 1),
        },
    )
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
