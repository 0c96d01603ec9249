"""Raw files on disk: opening (plain or gzip), first lines, read errors, and cutting into chunks.

Everything that touches the bytes of a raw Criteo/Avazu file before its rows are validated lives
here: gzip detection from the magic bytes, the UTF-8 byte-order mark, path checks with the config
key in the message, the line a truncated stream broke after, and :func:`read_chunks`, which cuts
the decompressed stream at line ends into ~``block_size`` chunks and parses each with
``pyarrow.csv`` (every column a string) in a helper thread, each chunk knowing its first line.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.csv as pacsv

from ..errors import DataError

if TYPE_CHECKING:
    from .raw_format import RawFormat

_BOM = b"\xef\xbb\xbf"


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


def read_first_line(path: Path) -> str:
    """The file's first line (decoded, without a byte-order mark or line end); an empty file raises."""
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


@dataclass
class Chunk:
    """One parsed chunk of a raw file (every column a string)."""

    table: pa.Table
    first_line: int  # 1-based file line of the chunk's first line
    ragged: list[tuple[int, int, str]]  # (file line, fields found, text) of rows the parser dropped


def _convert_options(f: RawFormat) -> pacsv.ConvertOptions:
    """Every read column as a string; an empty cell is null."""
    read_cols = f.read_columns
    return pacsv.ConvertOptions(
        include_columns=read_cols,
        column_types=dict.fromkeys(read_cols, pa.string()),
        strings_can_be_null=True,
        null_values=[""],
        quoted_strings_can_be_null=False,
    )


def _parse_chunk(
    path: Path, f: RawFormat, copts: pacsv.ConvertOptions, data: bytes, first_line: int
) -> Chunk:
    """Parse whole lines ``data`` (file lines from ``first_line`` on); ragged rows are dropped and listed."""
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
    return Chunk(table, first_line, ragged)


def _read_lines(path: Path, stream: pa.NativeFile, state: dict[str, Any], block_size: int) -> bytes | None:
    """The next ~``block_size`` bytes of whole lines (``state['carry']``: the partial line read ahead);
    ``None`` at the end of the file."""
    carry: bytes = state["carry"]
    while True:
        try:
            buf = stream.read(block_size)
        except OSError as e:
            good = _last_good_line(path)
            where = f"after line {good}, the last complete one" if good else "before its first complete line"
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
    return data


def _next_chunk(
    path: Path,
    f: RawFormat,
    copts: pacsv.ConvertOptions,
    stream: pa.NativeFile,
    state: dict[str, Any],
    block_size: int,
) -> Chunk | None:
    """Read and parse the next chunk (the header line skipped); ``None`` at the end of the file."""
    data = _read_lines(path, stream, state, block_size)
    if data is None:
        return None
    if state["skip_header"]:
        state["skip_header"] = False
        nl = data.find(b"\n")
        data = data[nl + 1 :]
        state["line"] += 1
        if not data:
            return _next_chunk(path, f, copts, stream, state, block_size)
    first = state["line"]
    state["line"] += data.count(b"\n")
    return _parse_chunk(path, f, copts, data, first)


def read_chunks(path: Path, f: RawFormat, block_size: int) -> Iterator[Chunk]:
    """Cut the (decompressed) file at line ends into ~block_size chunks and parse each one.

    Reading + decompressing + parsing the next chunk runs in a helper thread while the caller
    processes the current one (pyarrow releases the GIL), so memory stays at ~2 chunks and the
    two cores overlap. Each chunk knows its first line number, so errors name exact lines."""
    from concurrent.futures import ThreadPoolExecutor

    copts = _convert_options(f)
    stream = open_raw(path)
    state: dict[str, Any] = {"carry": b"", "line": 1, "skip_header": f.header, "bom": True}
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ihas-csv") as pool:
            fut = pool.submit(_next_chunk, path, f, copts, stream, state, block_size)
            while True:
                chunk = fut.result()
                if chunk is None:
                    return
                fut = pool.submit(_next_chunk, path, f, copts, stream, state, block_size)
                yield chunk
    finally:
        stream.close()
