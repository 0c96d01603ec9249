"""stage=prepare on the real Criteo/Avazu samples: splits, vocabulary, transforms, hashes, atomicity."""

from __future__ import annotations

import csv
import gzip
import logging
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ihas_lightning.data.feature_map import SPLITS, FeatureMap, is_complete
from ihas_lightning.data.prepare import SplitWriter
from ihas_lightning.data.raw_blocks import BadRows, _derive_hour, iter_blocks
from ihas_lightning.data.raw_format import AVAZU_COLUMNS, make_format, sniff
from ihas_lightning.data.splitting import assign_split
from ihas_lightning.data.tokens import log_square, numeric_key_to_token, numeric_keys
from ihas_lightning.data.vocab import VOCAB_FILE, load_encoders
from ihas_lightning.errors import ConfigError, DataError
from ihas_lightning.stages.prepare import ensure_prepared, run

REPO = Path(__file__).resolve().parents[1]


def _prep(cfg_factory, tmp_path, *overrides, name="out"):
    out = tmp_path / name
    cfg = cfg_factory("stage=prepare", f"dataset.prepared_dir={out}", *overrides)
    return ensure_prepared(cfg), cfg


def _prep_criteo_files(cfg_factory, tmp_path, criteo_raw, min_count):
    """Prepare the shared Criteo sample from its explicit train/val/test files."""
    files = [f"dataset.{s}_path={criteo_raw[s]}" for s in SPLITS]
    return _prep(cfg_factory, tmp_path, "dataset=criteo", f"dataset.min_count={min_count}", *files)


def _tables(path):
    return {s: pq.read_table(path / f"{s}.parquet") for s in SPLITS}


# ---- brute force reference ---------------------------------------------------------------------
def _criteo_rows(path):
    with open(path, newline="") as f:
        return [line.rstrip("\n").split("\t") for line in f]


def _criteo_tokens(row):
    """Hand-written reference transform: (label, [token per field]) with sortable tokens."""
    toks = []
    for v in row[1:14]:
        if v == "":
            toks.append((0, 0))  # missing: its own token, sorts first
        else:
            x = int(v)
            toks.append((1, math.floor(math.log(x) ** 2) if x > 2 else x))
    toks += [(0, "") if v == "" else (1, v) for v in row[14:]]
    return int(row[0]), toks


def _vocab(train_tokens, min_count):
    """Per field: token -> id by count desc then token asc; tokens below min_count are absent (id 0)."""
    vocabs = []
    for j in range(len(train_tokens[0])):
        cnt = Counter(t[j] for t in train_tokens)
        kept = sorted((t for t, c in cnt.items() if c >= min_count), key=lambda t: (-cnt[t], t))
        vocabs.append({t: i + 1 for i, t in enumerate(kept)})
    return vocabs


def _encode(tokens, vocabs):
    return np.array([[v.get(t, 0) for v, t in zip(vocabs, row)] for row in tokens], dtype=np.int64)


# ---- Criteo ----------------------------------------------------------------------------------------
@pytest.mark.shared
def test_criteo_single_file_matches_brute_force(cfg_factory, criteo_raw, tmp_path):
    path, cfg = _prep(cfg_factory, tmp_path, "dataset=criteo", f"dataset.raw_path={criteo_raw['train']}")
    fm = FeatureMap.load(path)
    assert fm.num_fields == 39 and fm.field_names[:2] == ["I1", "I2"] and fm.field_names[-1] == "C26"
    assert [f.kind for f in fm.fields[:13]] == ["numeric"] * 13
    rows = [_criteo_tokens(r) for r in _criteo_rows(criteo_raw["train"])]
    assert sum(fm.rows(s) for s in SPLITS) == len(rows) == 7200
    code = assign_split(np.arange(len(rows)), cfg.dataset.split_seed, [0.8, 0.1, 0.1])
    for i, s in enumerate(SPLITS):
        assert fm.rows(s) == int((code == i).sum())
    assert 0.75 < fm.rows("train") / 7200 < 0.85
    train = [rows[i] for i in np.flatnonzero(code == 0)]
    vocabs = _vocab([t for _, t in train], min_count=10)
    assert fm.vocab_sizes == [len(v) + 1 for v in vocabs]
    tables = _tables(path)
    for i, s in enumerate(SPLITS):
        part = [rows[k] for k in np.flatnonzero(code == i)]
        got = np.stack([tables[s][n].to_numpy() for n in fm.field_names], axis=1)
        np.testing.assert_array_equal(got, _encode([t for _, t in part], vocabs))
        np.testing.assert_array_equal(tables[s]["label"].to_numpy(), [lab for lab, _ in part])
        assert tables[s].schema.field("I1").type == "int32" and tables[s].schema.field("label").type == "int8"
        assert fm.splits[s]["pos_rate"] == pytest.approx(np.mean([lab for lab, _ in part]))
    assert fm.extra["skipped_rows"] == 0 and fm.config_hash and fm.input_hash


@pytest.mark.shared
def test_criteo_explicit_files_and_oov(cfg_factory, criteo_raw, tmp_path):
    path, _ = _prep_criteo_files(cfg_factory, tmp_path, criteo_raw, min_count=1)
    fm = FeatureMap.load(path)
    assert [fm.rows(s) for s in SPLITS] == [7200, 409, 391]
    train = [_criteo_tokens(r)[1] for r in _criteo_rows(criteo_raw["train"])]
    test = [_criteo_tokens(r)[1] for r in _criteo_rows(criteo_raw["test"])]
    vocabs = _vocab(train, min_count=1)
    tables = _tables(path)
    got = np.stack([tables["test"][n].to_numpy() for n in fm.field_names], axis=1)
    np.testing.assert_array_equal(got, _encode(test, vocabs))
    # no test-only token gets its own id, and there are test-only tokens to check
    train_sets = [{t[j] for t in train} for j in range(39)]
    test_only = [(i, j) for i, row in enumerate(test) for j, t in enumerate(row) if t not in train_sets[j]]
    assert len(test_only) > 50
    assert all(got[i, j] == 0 for i, j in test_only)
    for s in SPLITS:
        for j, n in enumerate(fm.field_names):
            col = tables[s][n].to_numpy()
            assert col.min() >= 0 and col.max() < fm.fields[j].vocab_size


@pytest.mark.shared
def test_saved_vocabulary_re_encodes_raw_rows(cfg_factory, criteo_raw, tmp_path):
    """vocab.parquet is enough to encode new raw rows exactly as prepare did (the serving path)."""
    from omegaconf import OmegaConf

    path, cfg = _prep_criteo_files(cfg_factory, tmp_path, criteo_raw, min_count=2)
    fm = FeatureMap.load(path)
    encoders = load_encoders(path)
    assert [e.vocab_size for e in encoders] == fm.vocab_sizes
    fmt = sniff(Path(criteo_raw["test"]), make_format(OmegaConf.to_container(cfg.dataset, resolve=True)))
    blocks = list(iter_blocks(Path(criteo_raw["test"]), fmt, 1 << 16, "error", BadRows()))
    got = np.concatenate([np.stack([e(k) for e, k in zip(encoders, b.keys)], axis=1) for b in blocks])
    want = np.stack([_tables(path)["test"][n].to_numpy() for n in fm.field_names], axis=1)
    np.testing.assert_array_equal(got, want)
    assert (want == 0).any() and (want > 0).any()  # OOV and kept tokens both exercised
    # a prepared dir without the file (older version) is a one-line error naming it
    (path / VOCAB_FILE).unlink()
    with pytest.raises(DataError, match="vocab.parquet: no saved vocabulary"):
        load_encoders(path)


@pytest.mark.shared
def test_min_count_oov_and_id_order(cfg_factory, criteo_raw, tmp_path):
    path, _ = _prep_criteo_files(cfg_factory, tmp_path, criteo_raw, min_count=5)
    fm = FeatureMap.load(path)
    t = pq.read_table(path / "train.parquet")
    for j, n in enumerate(fm.field_names):
        ids = t[n].to_numpy()
        counts = np.bincount(ids, minlength=fm.fields[j].vocab_size)
        kept = counts[1:]
        assert (kept >= 5).all()  # every kept id has >= min_count train rows
        assert (np.diff(kept) <= 0).all()  # ids ordered by count descending
    # C3 is long-tailed in the sample: rare tokens share the OOV id 0
    assert (t["C3"].to_numpy() == 0).mean() > 0.3


def test_numeric_transform_hand_values():
    x = np.array([3, 100, 2, 1, 0, -1, 4, 1000])
    expect = [1, 21, 2, 1, 0, -1, math.floor(math.log(4) ** 2), math.floor(math.log(1000) ** 2)]
    assert log_square(x).tolist() == expect == [1, 21, 2, 1, 0, -1, 1, 47]
    keys = numeric_keys(log_square(x), np.array([False] * 7 + [True]))
    assert keys[-1] == 0 and (keys[:-1] != 0).all()
    assert [numeric_key_to_token(k) for k in keys] == [1, 21, 2, 1, 0, -1, 1, None]
    assert (np.argsort(keys[:-1], kind="stable") == np.argsort(expect[:-1], kind="stable")).all()


def test_numeric_transform_end_to_end(cfg_factory, tmp_path):
    """I1 values 3, 100, 2, -1, missing (x3 each) map to distinct tokens 1, 21, 2, -1, missing."""
    cats = "\t".join(["abcd1234"] * 26)
    vals = ["3", "100", "2", "-1", "", "7", "8"]  # 7 -> floor(ln 7^2) = 3 and 8 -> 4
    lines = [f"{i % 2}\t{v}\t1\t1\t1\t1\t1\t1\t1\t1\t1\t1\t1\t1\t{cats}\n" for i, v in enumerate(vals * 3)]
    raw = tmp_path / "tiny.txt"
    raw.write_text("".join(lines))
    path, _ = _prep(cfg_factory, tmp_path, "dataset=criteo", "dataset.min_count=1", f"dataset.train_path={raw}",
                    f"dataset.val_path={raw}", f"dataset.test_path={raw}")  # fmt: skip
    fm = FeatureMap.load(path)
    # tokens 1(=3), 21(=100), 2, -1, missing, 3(=7), 4(=8): seven kept ids + OOV
    assert fm.fields[0].vocab_size == 1 + 7
    ids = pq.read_table(path / "train.parquet")["I1"].to_numpy()[: len(vals)]
    assert len(set(ids.tolist())) == 7 and 0 not in ids
    # all counts tie (3 each): ids follow token order, missing first, then -1, 1(=3), 2, 3(=7), 4(=8), 21(=100)
    order = {"": 1, "-1": 2, "3": 3, "2": 4, "7": 5, "8": 6, "100": 7}
    assert ids.tolist() == [order[v] for v in vals]
    assert fm.transforms["numeric"]["transform"] == "log_square"


# ---- Avazu -----------------------------------------------------------------------------------------
@pytest.mark.shared
def test_avazu_explicit_and_single(cfg_factory, avazu_raw, tmp_path):
    # the dev/test sample files have no header line: every line is a data row
    path, _ = _prep(
        cfg_factory, tmp_path, "dataset=avazu", *(f"dataset.{s}_path={avazu_raw[s]}" for s in SPLITS)
    )
    fm = FeatureMap.load(path)
    assert [fm.rows(s) for s in SPLITS] == [8087, 480, 432]
    assert fm.num_fields == 22 and "id" not in fm.field_names and fm.field_names[0] == "hour"
    with open(avazu_raw["train"]) as f:
        train = list(csv.DictReader(f))
    for j, name in enumerate(fm.field_names):
        cnt = Counter(r[name] for r in train)
        assert fm.fields[j].vocab_size == 1 + sum(c >= 10 for c in cnt.values()), name
    path2, _ = _prep(
        cfg_factory, tmp_path, "dataset=avazu", f"dataset.raw_path={avazu_raw['train']}", name="single"
    )
    fm2 = FeatureMap.load(path2)
    assert sum(fm2.rows(s) for s in SPLITS) == 8087
    assert fm2.splits["train"]["pos_rate"] == pytest.approx(
        pq.read_table(path2 / "train.parquet")["label"].to_numpy().mean()
    )


def test_avazu_hour_derive(cfg_factory, tmp_path):
    header = ",".join(AVAZU_COLUMNS)
    rest = ",".join(["1005", "0", "1fbe01fe", "f3845767", "28905ebd", "ecad2386", "7801e8d9", "07d7df22",
                     "a99f214a", "96809ac8", "711ee120", "1", "0", "15704", "320", "50", "1722", "0", "35",
                     "-1", "79"])  # fmt: skip
    hours = ["14102100", "14102623", "14102623", "14102915"]  # Tue 00h, Sun 23h, Sun 23h, Wed 15h
    raw = tmp_path / "av.csv"
    raw.write_text(header + "\n" + "".join(f"{i},{i % 2},{h},{rest}\n" for i, h in enumerate(hours)))
    over = ["dataset=avazu", "dataset.min_count=1", "dataset.hour_transform=derive",
            *(f"dataset.{s}_path={raw}" for s in SPLITS)]  # fmt: skip
    path, _ = _prep(cfg_factory, tmp_path, *over)
    fm = FeatureMap.load(path)
    assert fm.num_fields == 23 and fm.field_names[:2] == ["hour_of_day", "weekday"]
    assert fm.transforms["hour"] == "derive"
    t = pq.read_table(path / "train.parquet")
    # hour_of_day tokens 23 (x2) > 0, 15 -> ids by count desc then value asc: 23 -> 1, 0 -> 2, 15 -> 3
    assert t["hour_of_day"].to_numpy().tolist() == [2, 1, 1, 3]
    # weekday: Sunday=6 (x2) -> 1, Tuesday=1 -> 2, Wednesday=2 -> 3
    assert t["weekday"].to_numpy().tolist() == [2, 1, 1, 3]
    hod, wd, bad = _derive_hour(np.array([14102100, 14102623, 14103199, 14022900]), None)
    assert (
        hod.tolist()[:2] == [0, 23]
        and wd.tolist()[:2] == [1, 6]
        and bad.tolist() == [False, False, True, True]
    )


# ---- split determinism, gz, row groups -------------------------------------------------------------
@pytest.mark.shared
def test_split_deterministic_and_block_size_independent(cfg_factory, criteo_raw, tmp_path):
    base = ["dataset=criteo", f"dataset.raw_path={criteo_raw['train']}", "dataset.min_count=2"]
    a, _ = _prep(cfg_factory, tmp_path, *base, name="a")
    b, _ = _prep(cfg_factory, tmp_path, *base, "prepare.block_size_mb=0.07", name="b")  # ~27 blocks
    c, _ = _prep(cfg_factory, tmp_path, *base, "dataset.split_seed=1", name="c")
    ta, tb, tc = _tables(a), _tables(b), _tables(c)
    for s in SPLITS:
        assert ta[s].equals(tb[s])
    assert ta["test"].num_rows != tc["test"].num_rows or not ta["test"].equals(tc["test"])
    assert FeatureMap.load(a).config_hash == FeatureMap.load(b).config_hash
    codes = assign_split(np.arange(100_000), 7, [0.8, 0.1, 0.1])
    assert np.array_equal(codes, assign_split(np.arange(100_000), 7, [0.8, 0.1, 0.1]))
    assert np.array_equal(codes[5000:6000], assign_split(np.arange(5000, 6000), 7, [0.8, 0.1, 0.1]))
    assert abs((codes == 0).mean() - 0.8) < 0.01 and abs((codes == 2).mean() - 0.1) < 0.01


@pytest.mark.shared
def test_gzip_input_and_row_groups(cfg_factory, criteo_raw, tmp_path):
    gz = tmp_path / "train.txt.gz"
    with open(criteo_raw["train"], "rb") as f, gzip.open(gz, "wb") as g:
        shutil.copyfileobj(f, g)
    base = ["dataset=criteo", "dataset.row_group_size=1000"]
    a, _ = _prep(cfg_factory, tmp_path, *base, f"dataset.raw_path={criteo_raw['train']}", name="plain")
    b, _ = _prep(cfg_factory, tmp_path, *base, f"dataset.raw_path={gz}", name="gz")
    ta, tb = _tables(a), _tables(b)
    for s in SPLITS:
        assert ta[s].equals(tb[s])
    md = pq.ParquetFile(a / "train.parquet").metadata
    sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    assert (
        sizes[:-1] == [1000] * (len(sizes) - 1)
        and 0 < sizes[-1] <= 1000
        and sum(sizes) == ta["train"].num_rows
    )


# ---- output dir: atomicity, reuse, hashes ----------------------------------------------------------
@pytest.mark.shared
def test_failure_midway_leaves_nothing(cfg_factory, criteo_raw, tmp_path, monkeypatch):
    calls = {"n": 0}
    orig = SplitWriter.add

    def flaky(self, cols, label):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full (injected)")
        return orig(self, cols, label)

    monkeypatch.setattr(SplitWriter, "add", flaky)
    out = tmp_path / "out"
    cfg = cfg_factory("stage=prepare", "dataset=criteo", f"dataset.raw_path={criteo_raw['train']}",
                      f"dataset.prepared_dir={out}", "prepare.block_size_mb=0.1", "dataset.row_group_size=500")  # fmt: skip
    with pytest.raises(OSError, match="injected"):
        ensure_prepared(cfg)
    assert calls["n"] == 4
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert not any(is_complete(p) for p in tmp_path.rglob("*") if p.is_dir())


@pytest.mark.shared
def test_reuse_mismatch_and_overwrite(cfg_factory, criteo_raw, tmp_path, caplog):
    base = ["dataset=criteo", f"dataset.raw_path={criteo_raw['train']}"]
    path, _ = _prep(cfg_factory, tmp_path, *base)
    stamp = (path / "train.parquet").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="ihas_lightning"):
        # the block size does not change the output, so it is not part of the hash
        _prep(cfg_factory, tmp_path, *base, "prepare.block_size_mb=1")
    assert "reusing" in caplog.text
    assert (path / "train.parquet").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match=r"dataset.prepared_dir.*prepare.overwrite=true"):
        _prep(cfg_factory, tmp_path, *base, "dataset.min_count=3")
    old_hash = FeatureMap.load(path).config_hash
    _prep(cfg_factory, tmp_path, *base, "dataset.min_count=3", "prepare.overwrite=true")
    fm = FeatureMap.load(path)
    assert fm.min_count == 3 and fm.config_hash != old_hash
    # a changed input file (size/mtime) is a different input hash
    copy = tmp_path / "copy.txt"
    shutil.copy(criteo_raw["train"], copy)
    _prep(cfg_factory, tmp_path, "dataset=criteo", f"dataset.raw_path={copy}", name="c")
    os.utime(copy, ns=(1, 1))
    with pytest.raises(ConfigError, match="different input"):
        _prep(cfg_factory, tmp_path, "dataset=criteo", f"dataset.raw_path={copy}", name="c")
    # prepared_dir alone (no raw path) is used as is
    cfg = cfg_factory("stage=prepare", "dataset=criteo", f"dataset.prepared_dir={path}")
    metrics = run(cfg)
    assert metrics["rows/train"] == fm.rows("train") and metrics["vocab/total"] == sum(fm.vocab_sizes)


def test_config_errors(cfg_factory, tmp_path):
    raw = tmp_path / "x.txt"
    raw.write_text("0" + "\t" * 39 + "\n")
    cases = [
        (["dataset.split=[0.8,0.1,0.2]"], "dataset.split"),
        (["dataset.min_count=0"], "dataset.min_count"),
        (["prepare.on_bad_rows=ignore"], "prepare.on_bad_rows"),
        (["dataset.numeric_transform=sqrt"], "dataset.numeric_transform"),
        (["dataset.row_group_size=0"], "dataset.row_group_size"),
        ([f"dataset.train_path={raw}"], "dataset.train_path"),
        (
            [f"dataset.train_path={raw}", f"dataset.val_path={raw}", f"dataset.test_path={raw}"],
            "dataset.raw_path",
        ),
    ]
    for over, key in cases:
        cfg = cfg_factory("stage=prepare", "dataset=criteo", f"dataset.raw_path={raw}", *over)
        if "train_path" in over[0]:
            cfg.dataset.raw_path = None if len(over) == 1 else str(raw)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
            ensure_prepared(cfg)
        assert "\n" not in str(e.value)
    cfg = cfg_factory(
        "stage=prepare", "dataset=avazu", f"dataset.raw_path={raw}", "dataset.hour_transform=day"
    )
    with pytest.raises(ConfigError, match="dataset.hour_transform"):
        ensure_prepared(cfg)
    cfg = cfg_factory("stage=prepare", "dataset=criteo", f"dataset.prepared_dir={tmp_path / 'nothing'}")
    with pytest.raises(ConfigError, match="dataset.raw_path.*dataset.prepared_dir"):
        ensure_prepared(cfg)


def test_cli_subprocess(tmp_path):
    from ihas_lightning.data.rawgen import generate

    raw = generate("criteo", 3000, tmp_path / "c.txt", seed=1)
    out = tmp_path / "prep"
    env = {**os.environ, "IHAS_LOG_DIR": str(tmp_path / "logs"), "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "ihas_lightning", "stage=prepare", "dataset=criteo", f"dataset.raw_path={raw}",
           f"dataset.prepared_dir={out}", "logger=none", "prepare.progress=false"]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert is_complete(out) and "prepared criteo" in r.stdout and FeatureMap.load(out).rows("train") > 2000
    cmd[5] = f"dataset.raw_path={tmp_path / 'missing.txt'}"
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "missing.txt" in err[0] and "no such file" in err[0]
    assert "Traceback" not in r.stderr


def test_per_field_min_count(cfg_factory, tmp_path):
    from ihas_lightning.data.rawgen import generate

    raw = generate("criteo", 4000, tmp_path / "c.txt", seed=5)
    a, _ = _prep(cfg_factory, tmp_path, "dataset=criteo", f"dataset.raw_path={raw}", name="a")
    b, _ = _prep(cfg_factory, tmp_path, "dataset=criteo", f"dataset.raw_path={raw}",
                 "dataset.min_count={default:10,C3:1}", name="b")  # fmt: skip
    fa, fb = FeatureMap.load(a), FeatureMap.load(b)
    assert fb.min_count == {"default": 10, "C3": 1}
    i = fa.field_names.index("C3")
    assert fb.vocab_sizes[i] == 1 + fa.extra["distinct_train_tokens"]["C3"] > fa.vocab_sizes[i]
    assert fb.vocab_sizes[:i] == fa.vocab_sizes[:i] and fb.vocab_sizes[i + 1 :] == fa.vocab_sizes[i + 1 :]
    cfg = cfg_factory(
        "stage=prepare", "dataset=criteo", f"dataset.raw_path={raw}", "dataset.min_count={C99:2}"
    )
    with pytest.raises(ConfigError, match="dataset.min_count"):
        ensure_prepared(cfg)


def test_synthetic_generated_once_and_reused(cfg_factory, tmp_path, caplog):
    pytest.importorskip("ihas_lightning.data.synthetic")
    over = ["dataset=synthetic", "dataset.rows=3000", f"dataset.prepared_dir={tmp_path / 'syn'}"]
    path = ensure_prepared(cfg_factory("stage=prepare", *over))
    assert is_complete(path) and (path / "truth.json").is_file()
    fm = FeatureMap.load(path)
    assert sum(fm.rows(s) for s in SPLITS) == 3000 and fm.config_hash
    with caplog.at_level(logging.INFO, logger="ihas_lightning"):
        assert ensure_prepared(cfg_factory("stage=prepare", *over)) == path
    assert "reusing" in caplog.text
    with pytest.raises(ConfigError, match="prepare.overwrite=true"):
        ensure_prepared(cfg_factory("stage=prepare", *over, "dataset.gen_seed=8"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".syn")]


def test_input_edge_cases_blank_lines_bom_skips_and_truncated_gzip(
    cfg_factory, criteo_raw, avazu_raw, tmp_path
):
    """Blank lines are skipped and counted; a skipped bad row moves no other row to another split; a
    UTF-8 BOM is ignored (Avazu's header too); a truncated .gz names the last complete line."""
    from ihas_lightning.errors import DataError

    lines = criteo_raw["train"].read_text().splitlines(keepends=True)[:1500]
    clean = tmp_path / "clean.txt"
    clean.write_text("".join(lines))
    base = ["dataset=criteo", "dataset.min_count=1", "prepare.on_bad_rows=skip"]
    a, _ = _prep(cfg_factory, tmp_path, *base, f"dataset.raw_path={clean}", name="a")
    # the same rows + blank lines + one malformed row (bad label) in the middle
    messy = tmp_path / "messy.txt"
    bad_row = "7" + lines[0][1:]
    messy.write_text("".join(lines[:700]) + "\n" + bad_row + "".join(lines[700:]) + "\n\n")
    b, _ = _prep(cfg_factory, tmp_path, *base, f"dataset.raw_path={messy}", name="b")
    fb = FeatureMap.load(b)
    assert fb.extra["blank_lines_by_file"] == {str(messy): 3} and fb.extra["skipped_rows"] == 1
    assert sum(fb.rows(s) for s in SPLITS) == 1500 == sum(FeatureMap.load(a).rows(s) for s in SPLITS)
    # the same file with the bad row fixed (a copy of row 0: the vocabulary is unchanged): skipping the
    # bad row moved no other row to another split (the split hashes each row's line, not a counter)
    fixed = tmp_path / "fixed.txt"
    fixed.write_text(messy.read_text().replace(bad_row, lines[0], 1))
    c, _ = _prep(cfg_factory, tmp_path, *base, f"dataset.raw_path={fixed}", name="c")
    fc = FeatureMap.load(c)
    own = SPLITS[int(assign_split(np.array([701]), fc.extra["split"]["seed"], [0.8, 0.1, 0.1])[0])]
    tb, tc = _tables(b), _tables(c)
    for s in SPLITS:
        assert fc.rows(s) - fb.rows(s) == (1 if s == own else 0)
        if s != own:  # the same rows in the same order (ids may differ: the copy shifts token counts)
            assert tb[s].column("label").equals(tc[s].column("label"))
    with pytest.raises(DataError, match=r"column label \(the label\) must be 0 or 1, got '7'"):
        _prep(cfg_factory, tmp_path, "dataset=criteo", f"dataset.raw_path={messy}", name="f")

    # a BOM before Avazu's header
    av = tmp_path / "bom.csv"
    av.write_bytes(b"\xef\xbb\xbf" + avazu_raw["train"].read_bytes()[:200_000].rsplit(b"\n", 1)[0] + b"\n")
    d, _ = _prep(cfg_factory, tmp_path, "dataset=avazu", f"dataset.raw_path={av}", name="d")
    assert FeatureMap.load(d).rows("train") > 0

    # a truncated gzip: the last complete line
    gz = tmp_path / "t.gz"
    full = gzip.compress("".join(lines).encode())
    gz.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match=r"cannot read after line \d+, the last complete one"):
        _prep(cfg_factory, tmp_path, "dataset=criteo", f"dataset.raw_path={gz}", name="e")


def test_temp_dirs_of_dead_processes_are_cleaned_on_the_next_run(tmp_path):
    """A SIGKILL during prepare leaves `.criteo.tmp-<pid>-*`; the next atomic write beside it removes it
    (a live process's temp dir stays)."""
    from ihas_lightning.utils import atomic_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".criteo.tmp-{dead}-0000abcd"
    live = tmp_path / f".criteo.tmp-{os.getpid()}-0000beef"
    stale.mkdir()
    live.mkdir()
    (stale / "train.parquet").write_text("half")
    with atomic_dir(tmp_path / "criteo") as t:
        (t / "x").write_text("done")
    assert not stale.exists() and live.is_dir() and (tmp_path / "criteo" / "x").is_file()


def test_a_copy_renamed_into_place_while_writing_is_a_file_exists_error(tmp_path, monkeypatch):
    """Two jobs of a parallel multirun write the same output: the one that renames second sees the
    other's complete copy (FileExistsError, which the prepare stage answers by reusing it), never a bare
    OSError, and its own temp dir is gone."""
    from ihas_lightning import utils

    final = tmp_path / "synthetic"
    real_replace = utils.os.replace

    def other_job_first(src, dst):  # the other job's rename lands between our check and our rename
        if Path(dst) == final and not final.exists():
            final.mkdir()
            (final / "x").write_text("theirs")
        return real_replace(src, dst)

    monkeypatch.setattr(utils.os, "replace", other_job_first)
    with pytest.raises(FileExistsError, match="appeared while writing"):
        with utils.atomic_dir(final) as t:
            (t / "x").write_text("mine")
    assert (final / "x").read_text() == "theirs" and not list(tmp_path.glob(".synthetic.tmp-*"))
