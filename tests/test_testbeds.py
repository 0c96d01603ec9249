"""The low-CTR test beds (experiments/bench/testbeds.py): seeded positive downsampling to a rate."""

from __future__ import annotations

import pytest

from experiments.bench.testbeds import LOW_CTR, downsample_positives, low_ctr_sample


def test_downsampling_keeps_every_negative_and_reaches_the_rate():
    lines = [f"{int(i % 5 == 0)}\trow{i}\n" for i in range(10_000)]  # 20% positives
    lab = lambda ln: ln[0] == "1"  # noqa: E731
    for rate in (0.03, 0.01):
        out = downsample_positives(lines, lab, rate, seed=3)
        neg = [ln for ln in out if not lab(ln)]
        assert len(neg) == 8_000
        assert abs(sum(map(lab, out)) / len(out) - rate) < 0.0005
        assert out == sorted(out, key=lines.index)  # file order kept
        assert out == downsample_positives(lines, lab, rate, seed=3)  # seeded
    assert downsample_positives(lines, lab, rate=0.5, seed=0) == lines  # too few positives: all kept


@pytest.mark.shared
@pytest.mark.parametrize("dataset", ["criteo", "avazu"])
def test_low_ctr_samples_from_the_shared_files(dataset, tmp_path, criteo_raw, avazu_raw):
    for level, rate in LOW_CTR.items():
        f = low_ctr_sample(dataset, level, tmp_path)
        lines = f.read_text().splitlines()
        body = lines[1:] if dataset == "avazu" else lines
        col, sep = (1, ",") if dataset == "avazu" else (0, "\t")
        pos = sum(ln.split(sep)[col] == "1" for ln in body)
        assert abs(pos / len(body) - rate) < 0.002
        assert len(body) > 6_000
