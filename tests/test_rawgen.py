"""The raw-format generator: valid Criteo/Avazu text with realistic statistics, deterministic, gz."""

from __future__ import annotations

import gzip

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401
import pyarrow.csv as pacsv
import pytest

from ihas_lightning.data import rawgen
from ihas_lightning.data.feature_map import SPLITS, FeatureMap
from ihas_lightning.data.raw_format import AVAZU_COLUMNS, CRITEO_COLUMNS
from ihas_lightning.stages.prepare import ensure_prepared


def _read(path, fmt):
    if fmt == "criteo":
        ro = pacsv.ReadOptions(column_names=CRITEO_COLUMNS)
        po = pacsv.ParseOptions(delimiter="\t", quote_char=False)
        co = pacsv.ConvertOptions(column_types={c: pa.string() for c in CRITEO_COLUMNS[14:]})
    else:
        ro, po = pacsv.ReadOptions(), pacsv.ParseOptions(quote_char=False)
        co = pacsv.ConvertOptions(column_types={"id": pa.uint64()})
    return pacsv.read_csv(path, read_options=ro, parse_options=po, convert_options=co)


def test_criteo_statistics(tmp_path):
    p = rawgen.generate("criteo", 30_000, tmp_path / "c.txt", seed=1)
    first = p.read_text().split("\n", 1)[0]
    assert first.count("\t") == 39
    t = _read(p, "criteo")
    assert t.num_rows == 30_000
    assert 0.18 < np.mean(t["label"].to_numpy()) < 0.32
    miss = np.mean([t[f"I{i}"].null_count / t.num_rows for i in range(1, 14)])
    assert 0.1 < miss < 0.3
    assert (t["I2"].to_numpy(zero_copy_only=False) == -1).any()
    c3 = t["C3"].filter(pa.compute.not_equal(t["C3"], ""))  # empty = missing
    assert 0 < len(c3) < t.num_rows and all(len(v) == 8 for v in c3.to_pylist()[:100])
    distinct = [len(t[f"C{j}"].unique()) for j in range(1, 27)]
    assert distinct[8] <= 4 and max(distinct) > 3000  # tiny fields stay tiny, C3-like fields are long-tailed
    # Zipf-like: the most frequent C3 value is much more frequent than the median one
    counts = np.sort(np.asarray(c3.value_counts().field("counts")))[::-1]
    assert counts[0] > 20 * np.median(counts)


def test_cardinality_scaling():
    full = rawgen.CRITEO_ROWS
    assert rawgen.scaled_cardinality(10_131_227, full, full) == 10_131_227
    assert rawgen.scaled_cardinality(10_131_227, full // 10, full) == pytest.approx(1_013_123, rel=0.01)
    assert rawgen.scaled_cardinality(3, 100, full) == 3
    assert rawgen.scaled_cardinality(1460, 100, full) == 1000


def test_avazu_format_and_determinism(tmp_path):
    a = rawgen.generate("avazu", 5_000, tmp_path / "a.csv", seed=4)
    b = rawgen.generate("avazu", 5_000, tmp_path / "b.csv", seed=4)
    c = rawgen.generate("avazu", 5_000, tmp_path / "c.csv", seed=5)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert a.read_text().split("\n", 1)[0] == ",".join(AVAZU_COLUMNS)
    t = _read(a, "avazu")
    assert t.column_names == AVAZU_COLUMNS and t.num_rows == 5_000
    assert set(np.unique(t["click"].to_numpy())) == {0, 1}
    hours = t["hour"].to_numpy()
    assert hours.min() >= 14102100 and hours.max() <= 14103023 and (np.diff(hours) >= 0).all()


def test_gz_output_round_trips_through_prepare(tmp_path, cfg_factory):
    p = rawgen.generate("criteo", 3_000, tmp_path / "c.txt.gz", seed=2, gz=True)
    assert p.read_bytes()[:2] == b"\x1f\x8b"
    plain = rawgen.generate("criteo", 3_000, tmp_path / "c.txt", seed=2)
    assert gzip.decompress(p.read_bytes()) == plain.read_bytes()
    cfg = cfg_factory("stage=prepare", "dataset=criteo", f"dataset.raw_path={p}", "dataset.min_count=2",
                      f"dataset.prepared_dir={tmp_path / 'prep'}")  # fmt: skip
    fm = FeatureMap.load(ensure_prepared(cfg))
    assert sum(fm.rows(s) for s in SPLITS) == 3_000 and fm.extra["skipped_rows"] == 0


def test_cli(tmp_path, capsys):
    out = tmp_path / "x.csv"
    assert rawgen.main(["--format", "avazu", "--rows", "1200", "--out", str(out), "--seed", "3"]) == 0
    assert "wrote 1200 avazu rows" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 1201
    with pytest.raises(SystemExit):
        rawgen.main(["--format", "criteo", "--rows", "0", "--out", str(out)])


def test_criteo_positive_rate_moves_the_intercept_only(tmp_path):
    """--positive-rate: the labels' rate is near the target; the features are unchanged."""
    import numpy as np

    a = rawgen.generate("criteo", 20_000, tmp_path / "a.txt", seed=3)
    b = rawgen.generate("criteo", 20_000, tmp_path / "b.txt", seed=3, positive_rate=0.03)
    la, lb = a.read_text().splitlines(), b.read_text().splitlines()
    assert [r.split("\t", 1)[1] for r in la] == [r.split("\t", 1)[1] for r in lb]
    rate = np.mean([r[0] == "1" for r in lb])
    assert 0.025 < rate < 0.035 and np.mean([r[0] == "1" for r in la]) > 0.15
    sig = np.random.default_rng(0).normal(size=5000)
    bb = rawgen.intercept_for_rate(sig, 0.1)
    assert abs(np.mean(1 / (1 + np.exp(-(sig + bb)))) - 0.1) < 1e-6
