"""Malformed raw input: every class of bad row fails with one line naming file + line, or is skipped."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from ihas_lightning.data.feature_map import SPLITS, FeatureMap
from ihas_lightning.data.rawgen import generate
from ihas_lightning.errors import DataError
from ihas_lightning.stages.prepare import ensure_prepared

N = 400


@pytest.fixture
def criteo_lines(tmp_path) -> list[str]:
    return generate("criteo", N, tmp_path / "good_criteo.txt", seed=3).read_text().splitlines(keepends=True)


@pytest.fixture
def avazu_lines(tmp_path) -> list[str]:
    return generate("avazu", N, tmp_path / "good_avazu.csv", seed=3).read_text().splitlines(keepends=True)


def _write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    p = tmp_path / name
    p.write_text("".join(lines))
    return p


def _prepare(cfg_factory, tmp_path, fmt: str, raw: Path, mode: str = "fail", name: str = "out"):
    cfg = cfg_factory("stage=prepare", f"dataset={fmt}", f"dataset.raw_path={raw}", "dataset.min_count=1",
                      f"dataset.prepared_dir={tmp_path / name}", f"prepare.on_bad_rows={mode}")  # fmt: skip
    return FeatureMap.load(ensure_prepared(cfg))


def _fails(cfg_factory, tmp_path, fmt, raw, *patterns):
    with pytest.raises(DataError) as e:
        _prepare(cfg_factory, tmp_path, fmt, raw)
    msg = str(e.value)
    assert "\n" not in msg and str(raw) in msg
    for p in patterns:
        assert p in msg, msg
    assert not (tmp_path / "out").exists()
    return msg


def _skips(cfg_factory, tmp_path, fmt, raw, n_bad, n_rows):
    fm = _prepare(cfg_factory, tmp_path, fmt, raw, mode="skip", name="skipped")
    assert fm.extra["skipped_rows"] == n_bad
    assert fm.extra["skipped_by_file"] == {str(raw): n_bad}
    assert sum(fm.rows(s) for s in SPLITS) == n_rows - n_bad


def _edit(line: str, col: int, value: str, sep: str = "\t") -> str:
    parts = line.rstrip("\n").split(sep)
    parts[col] = value
    return sep.join(parts) + "\n"


def test_criteo_ragged_row(cfg_factory, tmp_path, criteo_lines):
    lines = list(criteo_lines)
    lines[4] = "\t".join(lines[4].split("\t")[:-1]) + "\n"  # line 5: 39 fields
    lines[200] = lines[200].rstrip("\n") + "\textra\n"  # line 201: 41 fields
    raw = _write(tmp_path, "ragged.txt", lines)
    _fails(cfg_factory, tmp_path, "criteo", raw, f"{raw}:5:", "expected 40 tab-separated fields, got 39")
    _skips(cfg_factory, tmp_path, "criteo", raw, 2, N)


def test_criteo_non_integer(cfg_factory, tmp_path, criteo_lines):
    lines = list(criteo_lines)
    lines[6] = _edit(lines[6], 3, "abc")  # I3 on line 7
    lines[9] = _edit(lines[9], 1, "1.5")  # I1 on line 10
    raw = _write(tmp_path, "nonint.txt", lines)
    _fails(cfg_factory, tmp_path, "criteo", raw, f"{raw}:7:", "I3", "integer", "'abc'")
    _skips(cfg_factory, tmp_path, "criteo", raw, 2, N)


def test_criteo_bad_label_and_blank_line(cfg_factory, tmp_path, criteo_lines):
    lines = list(criteo_lines)
    lines[2] = _edit(lines[2], 0, "2")  # line 3
    lines.insert(50, "\n")  # line 51: an empty line is skipped and counted, never an error
    lines.append("\n")  # a trailing empty line (very common)
    raw = _write(tmp_path, "label.txt", lines)
    _fails(cfg_factory, tmp_path, "criteo", raw, f"{raw}:3:", "column label (the label)", "0 or 1", "'2'")
    _skips(cfg_factory, tmp_path, "criteo", raw, 1, N)
    fm = _prepare(cfg_factory, tmp_path, "criteo", raw, mode="skip", name="blank")
    assert fm.extra["blank_lines_by_file"] == {str(raw): 2}
    del lines[2]  # without the bad label, the blank lines alone prepare in fail mode
    raw = _write(tmp_path, "blank.txt", lines)
    assert sum(_prepare(cfg_factory, tmp_path, "criteo", raw, name="ok").rows(s) for s in SPLITS) == N - 1


def test_criteo_first_bad_row_in_a_later_block(cfg_factory, tmp_path, criteo_lines):
    lines = criteo_lines * 10  # ~1 MB: several 64 KiB blocks
    lines[3456] = _edit(lines[3456], 0, "yes")
    raw = _write(tmp_path, "late.txt", lines)
    cfg = cfg_factory("stage=prepare", "dataset=criteo", f"dataset.raw_path={raw}",
                      f"dataset.prepared_dir={tmp_path / 'out'}", "prepare.block_size_mb=0.0625")  # fmt: skip
    with pytest.raises(DataError, match=f"{raw}:3457: column label"):
        ensure_prepared(cfg)


def test_criteo_comma_separated(cfg_factory, tmp_path, criteo_lines):
    raw = _write(tmp_path, "comma.csv", [ln.replace("\t", ",") for ln in criteo_lines])
    _fails(cfg_factory, tmp_path, "criteo", raw, f"{raw}:1:", "comma-separated", "tab-separated")


def test_empty_and_missing_files(cfg_factory, tmp_path):
    empty = _write(tmp_path, "empty.txt", [])
    _fails(cfg_factory, tmp_path, "criteo", empty, "empty file")
    empty_gz = tmp_path / "empty.txt.gz"
    with gzip.open(empty_gz, "wb"):
        pass
    _fails(cfg_factory, tmp_path, "criteo", empty_gz, "empty file")
    missing = tmp_path / "nope.txt"
    _fails(cfg_factory, tmp_path, "criteo", missing, "no such file", "dataset.raw_path")
    _fails(cfg_factory, tmp_path, "criteo", tmp_path, "not a regular file")


def test_corrupt_gzip(cfg_factory, tmp_path, criteo_lines):
    raw = tmp_path / "c.txt.gz"
    raw.write_bytes(gzip.compress("".join(criteo_lines * 20).encode())[:-4000])  # truncated stream
    _fails(cfg_factory, tmp_path, "criteo", raw)


def test_avazu_missing_header_columns(cfg_factory, tmp_path, avazu_lines):
    lines = list(avazu_lines)
    lines[0] = lines[0].replace(",click,", ",clicks,").replace(",C21", ",C_21")
    raw = _write(tmp_path, "hdr.csv", lines)
    _fails(cfg_factory, tmp_path, "avazu", raw, f"{raw}:1:", "missing column(s) click,C21")
    raw2 = _write(tmp_path, "tabs.csv", [ln.replace(",", "\t") for ln in avazu_lines])
    _fails(cfg_factory, tmp_path, "avazu", raw2, f"{raw2}:1:", "tab-separated")


def test_avazu_bad_rows_count_the_header_line(cfg_factory, tmp_path, avazu_lines):
    lines = list(avazu_lines)
    lines[5] = _edit(lines[5], 1, "x", sep=",")  # file line 6 (line 1 is the header)
    lines[7] = ",".join(lines[7].split(",")[:10]) + "\n"  # line 8: ragged
    raw = _write(tmp_path, "bad.csv", lines)
    _fails(cfg_factory, tmp_path, "avazu", raw, f"{raw}:6:", "column click (the label) must be 0 or 1")
    _skips(cfg_factory, tmp_path, "avazu", raw, 2, N)
    lines = list(avazu_lines)
    lines[7] = ",".join(lines[7].split(",")[:10]) + "\n"
    raw = _write(tmp_path, "ragged.csv", lines)
    _fails(cfg_factory, tmp_path, "avazu", raw, f"{raw}:8:", "expected 24 comma-separated fields, got 10")


def test_avazu_bad_hour_with_derive(cfg_factory, tmp_path, avazu_lines):
    lines = list(avazu_lines)
    lines[3] = _edit(lines[3], 2, "14133100", sep=",")  # month 13
    raw = _write(tmp_path, "hour.csv", lines)
    cfg = cfg_factory("stage=prepare", "dataset=avazu", f"dataset.raw_path={raw}", "dataset.hour_transform=derive",
                      f"dataset.prepared_dir={tmp_path / 'out'}")  # fmt: skip
    with pytest.raises(DataError, match=f"{raw}:4: hour must be YYMMDDHH"):
        ensure_prepared(cfg)
    # raw mode keeps hour as an opaque token: not an error
    assert _prepare(cfg_factory, tmp_path, "avazu", raw).extra["skipped_rows"] == 0


def test_skip_everything_is_an_error(cfg_factory, tmp_path, criteo_lines):
    raw = _write(tmp_path, "allbad.txt", [_edit(ln, 0, "9") for ln in criteo_lines[:20]])
    with pytest.raises(DataError, match="no valid training rows"):
        _prepare(cfg_factory, tmp_path, "criteo", raw, mode="skip")
