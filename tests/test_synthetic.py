"""The planted synthetic dataset: determinism, the planted truth, id conventions."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from ihas_lightning.data.feature_map import LABEL, SPLITS, FeatureMap
from ihas_lightning.data.synthetic import DEFAULTS, GROUP_COLUMN, KEY_FIELD, PROB_COLUMN, generate_synthetic
from ihas_lightning.errors import ConfigError

SMALL = {
    **DEFAULTS,
    "rows": 6000,
    "num_fields": 9,
    "num_groups": 3,
    "relevant_per_group": 2,
    "max_cardinality": 300,
    "row_group_size": 1000,
    "gen_seed": 11,
}


def _gen(tmp_path, name: str, **over):
    out = tmp_path / name
    out.mkdir()
    fm = generate_synthetic({**SMALL, **over}, out)
    return out, fm


def _truth(d) -> dict:
    return json.loads((d / "truth.json").read_text())


def test_same_seed_identical_different_seed_differs(tmp_path):
    a, fa = _gen(tmp_path, "a")
    b, fb = _gen(tmp_path, "b")
    c, _ = _gen(tmp_path, "c", gen_seed=12)
    assert fa.to_dict() == fb.to_dict()
    assert _truth(a) == _truth(b)
    for s in SPLITS:
        assert pq.read_table(a / f"{s}.parquet").equals(pq.read_table(b / f"{s}.parquet"))
        assert (a / f"{s}.parquet").read_bytes() == (b / f"{s}.parquet").read_bytes()
    assert not pq.read_table(a / "train.parquet").equals(pq.read_table(c / "train.parquet"))
    assert (
        _truth(a)["groups"] != _truth(c)["groups"] or _truth(a)["cardinalities"] != _truth(c)["cardinalities"]
    )


def test_truth_content(tmp_path):
    d, fm = _gen(tmp_path, "d")
    t = _truth(d)
    names = fm.field_names
    assert t["key_field"] == KEY_FIELD == names[0]
    groups = [set(v) for v in t["groups"].values()]
    assert len(groups) == SMALL["num_groups"]
    assert all(len(g) == SMALL["relevant_per_group"] for g in groups)
    union = set().union(*groups)
    assert len(union) == sum(len(g) for g in groups)  # disjoint
    assert union <= set(names[1:])  # non-key fields only
    assert set(t["noise_fields"]) == set(names[1:]) - union
    assert 0.5 < t["bayes_test_auc"] <= 1.0
    assert 0 < t["bayes_test_logloss"] < 1.0
    assert sum(t["group_sizes"].values()) == SMALL["rows"]
    assert fm.dataset == "synthetic" and fm.extra.get("synthetic") is True


def test_columns_ids_and_splits(tmp_path):
    d, fm = _gen(tmp_path, "d")
    assert sum(fm.rows(s) for s in SPLITS) == SMALL["rows"]
    assert fm.rows("train") == 4800 and fm.rows("val") == 600
    for s in SPLITS:
        pf = pq.ParquetFile(d / f"{s}.parquet")
        assert max(pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)) <= 1000
        tab = pf.read()
        schema = tab.schema
        for f in fm.fields:
            assert str(schema.field(f.name).type) == "int32"
            ids = tab.column(f.name).to_numpy()
            assert ids.min() >= 0 and ids.max() < f.vocab_size
            if s == "train":  # min_count=1: every value seen in train has an id
                assert ids.min() >= 1
        assert str(schema.field(LABEL).type) == "int8"
        assert str(schema.field(GROUP_COLUMN).type) == "int8"
        assert str(schema.field(PROB_COLUMN).type) == "float"
    # every train id is used: ids are dense 1..V-1
    train = pq.read_table(d / "train.parquet")
    for f in fm.fields:
        assert len(np.unique(train.column(f.name).to_numpy())) == f.vocab_size - 1


def test_min_count_maps_rare_values_to_oov(tmp_path):
    _, fm1 = _gen(tmp_path, "m1")
    d5, fm5 = _gen(tmp_path, "m5", min_count=5)
    assert sum(fm5.vocab_sizes) < sum(fm1.vocab_sizes)
    train = pq.read_table(d5 / "train.parquet")
    assert any((train.column(f.name).to_numpy() == 0).any() for f in fm5.fields)
    assert FeatureMap.load(d5).min_count == 5


def test_labels_follow_true_probability(tmp_path):
    d, _ = _gen(tmp_path, "d", rows=20000)
    tab = pq.read_table(d / "train.parquet")
    y = tab.column(LABEL).to_numpy().astype(float)
    p = tab.column(PROB_COLUMN).to_numpy().astype(float)
    se = np.sqrt((p * (1 - p)).sum()) / len(p)
    assert abs(y.mean() - p.mean()) < 4 * se
    hi = p > np.median(p)
    assert y[hi].mean() > y[~hi].mean() + 0.1


def test_group_is_a_function_of_the_key(tmp_path):
    d, _ = _gen(tmp_path, "d")
    t = _truth(d)
    key_groups = {int(k): g for k, g in t["key_groups"].items()}
    for s in SPLITS:
        tab = pq.read_table(d / f"{s}.parquet")
        key = tab.column(KEY_FIELD).to_numpy()
        grp = tab.column(GROUP_COLUMN).to_numpy()
        seen = key > 0
        expect = np.array([key_groups[int(k)] for k in key[seen]])
        assert (grp[seen] == expect).all()
    assert sorted(set(key_groups.values())) == list(range(SMALL["num_groups"]))


def test_only_the_groups_relevant_fields_drive_p(tmp_path):
    """Within group g, rows with equal relevant(g) ids have equal p; dropping one relevant field breaks that."""
    d, fm = _gen(tmp_path, "d")
    t = _truth(d)
    tab = pq.read_table(d / "train.parquet")
    grp = tab.column(GROUP_COLUMN).to_numpy()
    p = tab.column(PROB_COLUMN).to_numpy()

    def constant_within(cols: list[str], rows: np.ndarray) -> bool:
        keys = np.stack([tab.column(c).to_numpy()[rows] for c in cols], axis=1)
        _, inv = np.unique(keys, axis=0, return_inverse=True)
        inv = inv.ravel()
        pr = p[rows]
        lo = np.full(inv.max() + 1, np.inf)
        hi = np.full(inv.max() + 1, -np.inf)
        np.minimum.at(lo, inv, pr)
        np.maximum.at(hi, inv, pr)
        return bool(np.all(hi - lo < 1e-6))

    for g, rel in t["groups"].items():
        rows = np.flatnonzero(grp == int(g))
        assert constant_within(rel, rows)
        for f in rel:  # each relevant field matters
            assert not constant_within([c for c in rel if c != f], rows)
        # the key and the noise fields do not determine p
        assert not constant_within([KEY_FIELD] + t["noise_fields"], rows)


@pytest.mark.parametrize(
    "over",
    [{"relevant_per_group": 5}, {"split": [0.5, 0.5, 0.5]}, {"min_cardinality": 1}, {"key_cardinality": 2}],
)
def test_bad_config_is_a_config_error(tmp_path, over):
    with pytest.raises(ConfigError, match="dataset\\."):
        _gen(tmp_path, "bad", **over)
