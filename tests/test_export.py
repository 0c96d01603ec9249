"""stage=export: the serving artifact (ONNX + torch.export + vocabulary) predicts what the Python model
predicts, and a service can use it without this package."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import FAST_FITS

ort = pytest.importorskip("onnxruntime", reason="onnxruntime comes with the serve extra (make install)")

TINY = [*FAST_FITS, "cluster.min_cluster_size=10"]


def _run(cfg_factory, out: Path, *overrides: str) -> Path:
    from ihas_lightning import pipeline

    pipeline.run(cfg_factory("stage=all", *overrides, *TINY, output_dir=out))
    return out


def _export(cfg_factory, run: Path, *extra: str) -> dict:
    from ihas_lightning import pipeline

    pipeline.run_stage(cfg_factory("stage=export", f"export.run={run}", *extra))
    return json.loads((run / "export" / "manifest.json").read_text())


@pytest.mark.parametrize("method", ["ihas", "autofield"])
def test_exported_onnx_and_pt2_equal_the_python_model(cfg_factory, tmp_path, method):
    from ihas_lightning.serving import load_run_config, load_run_models

    run = _run(cfg_factory, tmp_path / "run", f"method={method}", "dataset.rows=3000")
    man = _export(cfg_factory, run)
    assert man["routed"] is (method == "ihas") and man["model"] == (
        "iHAS" if method == "ihas" else "AutoField"
    )
    assert set(man["formats"]) == {"onnx", "pt2"} and all(f["ok"] for f in man["formats"].values())
    # independently of the stage's own check: onnxruntime on the test split vs the run's model
    rm = load_run_models(load_run_config(run))
    t = pq.read_table(rm.prepared / "test.parquet")
    x = np.stack([t.column(n).to_numpy() for n in rm.fmap.field_names], 1).astype(np.int64)
    sess = ort.InferenceSession(str(run / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    p, c = sess.run(None, {"x": x})
    name, fn, _, _ = rm.entry("final")
    with torch.inference_mode():
        if rm.routed is not None:
            logits, clusters = rm.routed.forward_with_clusters(torch.from_numpy(x))
            assert np.array_equal(c, clusters.numpy())
        else:
            logits = fn(torch.from_numpy(x))
    assert np.abs(p - torch.sigmoid(logits).numpy()).max() <= 1e-6
    assert not (run / "export" / "model.onnx.data").exists()  # one self-contained graph file
    # the plain models (Base, AutoField's retrained model) are served folded: the trained model's logits
    from ihas_lightning.models.compact import foldable

    for row, fn_, source, _ in rm.entries:
        if row in rm.modes and rm.modes[row] == "open":
            assert foldable(source)
            with torch.inference_mode():
                xt = torch.from_numpy(x)
                torch.testing.assert_close(fn_(xt), source(xt, "open"), rtol=0, atol=1e-6)


def test_export_refuses_an_existing_artifact_and_a_bad_run(cfg_factory, tmp_path):
    from ihas_lightning.errors import ConfigError, DataError

    run = _run(cfg_factory, tmp_path / "run", "method=base", "dataset.rows=2000")
    _export(cfg_factory, run, "export.formats=[pt2]")
    with pytest.raises(DataError):
        _export(cfg_factory, run, "export.formats=[pt2]")
    _export(cfg_factory, run, "export.formats=[pt2]", "export.overwrite=true")
    with pytest.raises(ConfigError, match="export.formats"):
        _export(cfg_factory, run, "export.formats=[tflite]")
    with pytest.raises(DataError, match="not a run dir"):
        _export(cfg_factory, tmp_path, "export.formats=[pt2]")


def _encode_without_the_package(lines: list[str], vocab: dict, fields: list[str]) -> np.ndarray:
    """What a service does with the artifact alone: split the raw Criteo row, transform the numeric
    fields (floor(ln(x)^2) for x > 2), look each token up in vocab.parquet (not listed: id 0)."""
    x = np.zeros((len(lines), len(fields)), dtype=np.int64)
    for i, line in enumerate(lines):
        cells = line.rstrip("\n").split("\t")[1:]  # drop the label
        for j, (name, cell) in enumerate(zip(fields, cells)):
            if cell == "":
                token = None
            elif name.startswith("I"):
                v = int(cell)
                token = str(math.floor(math.log(v) ** 2)) if v > 2 else str(v)
            else:
                token = cell
            x[i, j] = vocab[name].get(token, 0)
    return x


@pytest.mark.shared
def test_a_service_scores_raw_criteo_rows_with_the_artifact_alone(cfg_factory, criteo_raw, tmp_path):
    """Raw rows -> vocab.parquet lookups -> onnxruntime: the probabilities of stage=predict (1e-6)."""
    from ihas_lightning import pipeline

    run = _run(cfg_factory, tmp_path / "run", "dataset=criteo", "dataset.min_count=2",
               *(f"dataset.{s}_path={p}" for s, p in criteo_raw.items()))  # fmt: skip
    man = _export(cfg_factory, run)
    fields = [f["name"] for f in man["fields"]]
    vocab: dict[str, dict] = {f: {} for f in fields}
    for row in pq.read_table(run / "export" / "vocab.parquet").to_pylist():
        vocab[row["field"]][row["token"]] = row["id"]
    lines = criteo_raw["test"].read_text().splitlines()
    x = _encode_without_the_package(lines, vocab, fields)
    sess = ort.InferenceSession(str(run / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    p, _ = sess.run(None, {"x": x})
    out = tmp_path / "preds.parquet"
    pipeline.run_stage(cfg_factory("stage=predict", f"predict.run={run}", f"predict.input={criteo_raw['test']}",
                                   f"predict.output={out}", "predict.progress=false"))  # fmt: skip
    ref = np.asarray(pq.read_table(out).column("probability").to_pylist())
    assert len(p) == len(ref) == len(lines)
    assert np.abs(p - ref).max() <= 1e-6


@pytest.mark.slow  # a benchmark script's own check (lab code): make test-all
def test_bench_serve_measures_every_candidate_on_a_criteo_shaped_model(tmp_path):
    """The serving benchmark's candidates compute the same probabilities; its timers run (no speed is
    asserted: speed lives in experiments/results/bench_serve.md)."""
    from experiments.bench import bench_serve

    base, routed, x, info = bench_serve.criteo_shaped(total_ids=5000, rows=1024)
    assert info["fields"] == 39 and 4000 < info["ids"] < 6000
    fns = bench_serve.candidates(base, routed, x, tmp_path, onnx=True)
    with torch.inference_mode():
        exact = torch.sigmoid(fns["ihas_exact"](x))
        graph = fns["ihas_graph"](x)[0]
        prep, run = fns["ihas_models_only"]
        models = torch.sigmoid(run(x, prep(x)))
        prep, run = fns["ihas_models_only_trained_layout"]
        trained = torch.sigmoid(run(x, prep(x)))
        fast, fast_trained = fns["ihas_fast"](x), fns["ihas_fast_trained_layout"](x)
        unfused = fns["ihas_fast_unfused"](x)
        base_p = torch.sigmoid(fns["base"](x))
        torch.testing.assert_close(torch.sigmoid(fns["base_folded"](x)), base_p, rtol=0, atol=1e-6)
    assert np.abs(fns["onnx_base_folded"](x)[0] - base_p.numpy()).max() <= 1e-6
    assert np.abs(fns["onnx_ihas_fast"](x)[0] - torch.sigmoid(fast).numpy()).max() <= 1e-6
    torch.testing.assert_close(fast, unfused, rtol=0, atol=1e-6)
    onnx_p = fns["onnx_ihas"](x)[0]
    assert torch.allclose(exact, graph, atol=1e-6) and torch.equal(exact, models)
    # the serving layout computes what the trained layout does
    assert torch.allclose(exact, trained, rtol=0, atol=1e-6) and torch.allclose(
        fast, fast_trained, rtol=0, atol=1e-6
    )
    assert np.abs(onnx_p - exact.numpy()).max() <= 1e-6
    res = bench_serve.measure({"base": fns["base"], "ihas_models_only": fns["ihas_models_only"]}, x, single=5)
    assert set(res["base"]) == {"b1_p50_ms", "b1_p99_ms", "b256_ms", "b4096_rows_per_s"}
    threads = torch.get_num_threads()
    one = bench_serve.one_thread({k: fns[k] for k in bench_serve.ONE_THREAD}, x, rounds=1)
    assert set(one) == set(bench_serve.ONE_THREAD) and torch.get_num_threads() == threads


def test_the_low_rank_gate_is_the_gate_truncated_by_svd():
    """The bench's low-rank gate: rank r gives a gate weight of rank r that is the best rank-r
    approximation; at full rank it is the gate itself (to float error), and routing runs through it."""
    from experiments.bench import bench_serve

    _, routed, x, _ = bench_serve.criteo_shaped(total_ids=3000, rows=512)
    search = routed.search_model
    w = search.gate.linear.weight.detach()
    width = w.shape[0]
    assert set(bench_serve.LOW_RANKS) < set(range(1, width))
    with torch.inference_mode():
        e = search.embed(x)
        full = bench_serve.low_rank_gate(routed, width)
        torch.testing.assert_close(
            full.search_model.gate.gate_logits(e), search.gate.gate_logits(e), rtol=0, atol=1e-4
        )
        r = 16
        low = bench_serve.low_rank_gate(routed, r)
        down, up = low.search_model.gate.linear
        wr = up.weight @ down.weight
        assert torch.linalg.matrix_rank(wr) == r
        s = torch.linalg.svdvals(w)
        # Eckart-Young: the error of the best rank-r approximation is the tail of the singular values
        torch.testing.assert_close(
            torch.linalg.matrix_norm(w - wr), s[r:].square().sum().sqrt(), rtol=1e-4, atol=1e-5
        )
        assert low.route(x).shape == (len(x),) and isinstance(
            search.gate.linear, torch.nn.Linear
        )  # not changed
