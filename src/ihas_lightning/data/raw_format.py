"""The raw formats: Criteo TSV and Avazu CSV columns, their output fields, and header sniffing.

A :class:`RawFormat` says how one raw format is read (separator, header, columns in file order,
label, integer-validated columns) and which fields it yields with which kind and transform
(Criteo's numeric ``log_square`` or ``raw``, Avazu's ``hour`` kept or derived). :func:`make_format`
builds it from the dataset config; :func:`sniff` checks a file's first line (separator, the Avazu
header in any column order, a headerless Avazu split file, a file without the label column) and
returns the format with that file's columns; :func:`transforms_record` is what ``feature_map.json``
records about the transforms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from .raw_io import read_first_line

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


def sniff(path: Path, f: RawFormat, label_optional: bool = False) -> RawFormat:
    """Check the first line (separator, Avazu header) and return the format with its file columns.
    ``label_optional`` (new rows to score): a file without the label column is accepted."""
    line = read_first_line(path)
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
