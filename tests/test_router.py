"""The distilled router (fast routing): its forward against a loop, its training in the cluster stage, and
its use by evaluate, predict and export (the exact routing stays the default)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import FAST_FITS

# the shared run of these tests searches two epochs (one more than FAST_FITS)
TINY = [*(o for o in FAST_FITS if not o.startswith("search.max_epochs")), "search.max_epochs=2",
        "cluster.min_cluster_size=10"]  # fmt: skip


def test_linear_router_is_a_sum_of_per_id_weights():
    from ihas_lightning.models.router import LinearRouter

    torch.manual_seed(0)
    vocab = [3, 5, 2]
    r = LinearRouter(vocab, k=4)
    torch.nn.init.normal_(r.weight.weight)
    torch.nn.init.normal_(r.bias)
    x = torch.tensor([[0, 4, 1], [2, 0, 0], [1, 3, 1]])
    want = torch.stack(
        [r.bias + sum(r.weight.weight[sum(vocab[:f]) + int(row[f])] for f in range(3)) for row in x]
    )
    assert torch.allclose(r(x), want) and torch.equal(r.route(x), want.argmax(1))


def test_the_embedding_classifier_folds_into_the_id_table():
    """features=embedding: the folded router's logits are the standardised linear classifier's on the
    searched embedding, against a per-sample loop over the fields."""
    from ihas_lightning.models import DLRM
    from ihas_lightning.modules.router import RouterModule, embedding_stats

    torch.manual_seed(0)
    vocab = [7, 3, 11, 5]
    search = DLRM(vocab, 16, gate={}).eval()
    x = torch.stack([torch.randint(0, v, (300,)) for v in vocab], 1)
    mean, std = embedding_stats(search.embedding, x, batch_size=64)
    with torch.no_grad():
        e = search.embed(x)
    torch.testing.assert_close(mean, e.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(std, e.std(0, unbiased=False), rtol=1e-4, atol=1e-7)
    module = RouterModule(vocab, 3, features="embedding", embedding=search.embedding, mean=mean, std=std)
    torch.nn.init.normal_(module.head.weight)
    torch.nn.init.normal_(module.head.bias)
    router = module.distilled()
    with torch.no_grad():
        want = module(x)
        torch.testing.assert_close(router(x), want, rtol=1e-5, atol=1e-4)
        w, b = module.head.weight, module.head.bias
        for i in range(5):  # brute force: the field's rows of the standardised embedding, summed per field
            z = (e[i] - mean) / std.clamp_min(1e-6)
            torch.testing.assert_close(router(x[i : i + 1])[0], w @ z + b, rtol=1e-5, atol=1e-4)
    assert torch.equal(router.route(x), want.argmax(1))
    with pytest.raises(ValueError, match="needs the searched embedding"):
        RouterModule(vocab, 3, features="embedding")
    with pytest.raises(ValueError, match="router features must be one of"):
        RouterModule(vocab, 3, features="gate")


@pytest.fixture(scope="module")
def run_with_router(tmp_path_factory):
    from conftest import stage_all

    return stage_all(tmp_path_factory.mktemp("router"), "dataset.rows=4000", *TINY)


def test_the_cluster_stage_distils_the_assignment_and_evaluate_reports_both_routings(run_with_router):
    run, _ = run_with_router
    info = json.loads((run / "cluster" / "cluster.json").read_text())
    agree = info["router"]["agreement"]
    assert (run / "cluster" / "router.pt").is_file() and set(agree) == {"train", "val", "test"}
    # the default: the embedding classifier, at least min_steps steps on this small train split
    assert info["router"]["features"] == "embedding" and info["router"]["steps"] >= 300
    # one fit per weight decay of the default list; the chosen one has the best validation agreement
    by_wd = info["router"]["val_agreement_by_weight_decay"]
    assert set(by_wd) == {"0", "0.001", "0.01"} and f"{info['router']['weight_decay']:g}" in by_wd
    assert by_wd[f"{info['router']['weight_decay']:g}"] == max(by_wd.values()) == agree["val"]
    assert all(0.5 < a <= 1.0 for a in agree.values())  # far better than chance for k=2 on planted groups
    res = json.loads((run / "evaluate" / "results.json").read_text())
    names = [r["model"] for r in res["rows"]]
    assert (
        names == ["Base", "iHAS-1", "iHAS (fast routing)", "iHAS", "Constant"] and res["final_row"] == "iHAS"
    )
    fr = res["fast_routing"]
    fast = next(r for r in res["rows"] if r["model"] == "iHAS (fast routing)")
    exact = next(r for r in res["rows"] if r["model"] == "iHAS")
    for split in ("val", "test"):
        assert fr[f"{split}_auc_minus_exact"] == pytest.approx(fast[f"{split}_auc"] - exact[f"{split}_auc"])
        # evaluate routes as the stage did (the stage's subsets are the whole splits here)
        assert fr[f"agreement_{split}"] == pytest.approx(agree[split], abs=1e-6)
        lo, hi = fr[f"{split}_auc_minus_exact_ci95"]  # DeLong's interval around the difference
        assert lo <= fr[f"{split}_auc_minus_exact"] <= hi and fr[f"{split}_within_0.001"] in (
            "met",
            "undecided",
            "not met",
        )


def test_routing_auto_serves_fast_only_where_evaluate_found_it_within_0_001_on_validation(
    cfg_factory, run_with_router, tmp_path
):
    from ihas_lightning import pipeline
    from ihas_lightning.serving import choose_routing, load_run_config, load_run_models

    run, prepared = run_with_router
    rm = load_run_models(load_run_config(run))
    res = json.loads((run / "evaluate" / "results.json").read_text())
    fake = tmp_path / "evaluate" / "results.json"
    fake.parent.mkdir()
    for verdict, want in (("met", "fast"), ("undecided", "exact"), ("not met", "exact")):
        fake.write_text(
            json.dumps({**res, "fast_routing": {**res["fast_routing"], "val_within_0.001": verdict}})
        )
        routing, why = choose_routing(tmp_path, "auto", rm)
        assert routing == want and ("within 0.001" in why), (verdict, why)
    assert choose_routing(tmp_path, "auto", rm, "base") == ("exact", "the model does not route")
    assert (
        choose_routing(tmp_path, "exact", rm)[0] == "exact"
        and choose_routing(tmp_path, "fast", rm)[0] == "fast"
    )
    fake.unlink()
    routing, why = choose_routing(tmp_path, "auto", rm)
    assert routing == "exact" and "run stage=evaluate" in why
    # through the CLI, on the run's own verdict
    want = "fast" if res["fast_routing"]["val_within_0.001"] == "met" else "exact"
    out = tmp_path / "auto.parquet"
    pipeline.run_stage(cfg_factory("stage=predict", f"predict.run={run}", f"predict.input={prepared / 'test.parquet'}",
                                   f"predict.output={out}", "predict.routing=auto", "predict.progress=false"))  # fmt: skip
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["model"] == ("iHAS (fast routing)" if want == "fast" else "iHAS")


def test_predict_and_export_with_fast_routing(cfg_factory, run_with_router):
    from ihas_lightning import pipeline

    run, prepared = run_with_router
    out = run / "predict" / "fast.parquet"
    pipeline.run_stage(cfg_factory("stage=predict", f"predict.run={run}", f"predict.input={prepared / 'test.parquet'}",
                                   f"predict.output={out}", "predict.routing=fast", "predict.progress=false"))  # fmt: skip
    summary = json.loads(out.with_suffix(".json").read_text())
    res = json.loads((run / "evaluate" / "results.json").read_text())
    fast = next(r for r in res["rows"] if r["model"] == "iHAS (fast routing)")
    assert summary["model"] == "iHAS (fast routing)" and summary["auc"] == pytest.approx(
        fast["test_auc"], abs=1e-9
    )
    pytest.importorskip("onnxruntime")
    pipeline.run_stage(cfg_factory("stage=export", f"export.run={run}", "export.routing=fast",
                                   f"export.dir={run / 'export_fast'}"))  # fmt: skip
    man = json.loads((run / "export_fast" / "manifest.json").read_text())
    assert man["routing"].startswith("fast") and all(f["ok"] for f in man["formats"].values())
    assert man["routing_reason"] == "routing=fast given"
    import onnxruntime as ort

    t = pq.read_table(prepared / "test.parquet")
    x = np.stack(
        [t.column(n).to_numpy() for n in t.column_names if n != "label" and not n.startswith("_")], 1
    )
    p, c = ort.InferenceSession(str(run / "export_fast" / "model.onnx")).run(None, {"x": x.astype(np.int64)})
    got = pq.read_table(out)
    assert np.abs(p - np.asarray(got.column("probability").to_pylist())).max() <= 1e-6
    assert c.tolist() == got.column("cluster").to_pylist()


def test_without_a_router_fast_routing_is_a_one_line_error(cfg_factory, tmp_path):
    from ihas_lightning import pipeline
    from ihas_lightning.errors import DataError

    run = tmp_path / "run"
    cfg = cfg_factory("stage=all", "dataset.rows=3000", "cluster.router.enabled=false", *TINY, output_dir=run)
    pipeline.run(cfg)
    assert not (run / "cluster" / "router.pt").exists()
    res = json.loads((run / "evaluate" / "results.json").read_text())
    assert "fast_routing" not in res and "iHAS (fast routing)" not in [r["model"] for r in res["rows"]]
    prepared = Path(str(cfg.dataset.prepared_dir))
    with pytest.raises(DataError, match="no distilled router"):
        pipeline.run_stage(cfg_factory("stage=predict", f"predict.run={run}", "predict.routing=fast",
                                       f"predict.input={prepared / 'test.parquet'}", "predict.progress=false"))  # fmt: skip


def test_the_serve_exact_warning_is_decided_on_validation():
    """Which routing to serve is a choice: the warning follows the validation AUC difference; the test
    difference is only reported."""
    from ihas_lightning.stages.evaluate import fast_routing_report

    def rows(val_fast, test_fast):
        fast = {"val_auc": val_fast, "test_auc": test_fast, "inference_ms": 0.1}
        return fast, {"val_auc": 0.70, "test_auc": 0.70, "inference_ms": 2.0}

    report, warning = fast_routing_report(*rows(0.698, 0.703), {"val": 0.97, "test": 0.96})
    assert warning and "0.0020 validation AUC" in warning and "test +0.0030" in warning
    assert report["val_auc_minus_exact"] == pytest.approx(-0.002) and report["agreement_test"] == 0.96
    _, warning = fast_routing_report(*rows(0.6995, 0.690), {"val": 0.99, "test": 0.95})
    assert warning is None  # test is 0.01 worse, validation within 0.001: no choice made on test
    _, warning = fast_routing_report(*rows(None, 0.690), {"val": None, "test": 0.95})
    assert warning is None  # no validation AUC (one class): nothing to decide on


def test_the_fast_routing_target_is_judged_on_the_interval_of_the_difference():
    """Within 0.001 of the exact routing: met only when the whole 95% interval is above -0.001; a
    split too small to tell is undecided, not a cost or a gain."""
    from ihas_lightning.stages.evaluate import fast_routing_report, fast_routing_target

    assert fast_routing_target([-0.0004, 0.0003]) == "met"
    assert fast_routing_target([-0.009, -0.002]) == "not met"
    assert fast_routing_target([-0.008, 0.004]) == "undecided"
    assert fast_routing_target([None, None]) == "n/a"
    # the interval is estimated from the rerouted rows alone: a handful of them decides nothing
    assert fast_routing_target([-0.0003, 0.0059], rerouted=8) == "undecided"
    assert fast_routing_target([-0.0003, 0.0059], rerouted=1800) == "met"
    assert fast_routing_target([0.0, 0.0], rerouted=0) == "met"  # the same clusters: the same scores
    fast = {"val_auc": 0.697, "test_auc": 0.701, "inference_ms": 0.1}
    exact = {"val_auc": 0.70, "test_auc": 0.70, "inference_ms": 2.0}
    diffs = {
        "val": {"ci": [-0.009, 0.003], "rerouted": 40},
        "test": {"ci": [-0.0002, 0.0021], "rerouted": 35},
    }
    report, warning = fast_routing_report(fast, exact, {"val": 0.97, "test": 0.98}, diffs)
    assert report["val_within_0.001"] == "undecided" and report["test_within_0.001"] == "met"
    assert report["val_auc_minus_exact_ci95"] == [-0.009, 0.003] and report["test_rerouted_rows"] == 35
    assert "95% CI [-0.0090, +0.0030]" in warning and "serve with routing=exact" in warning


@pytest.mark.parametrize("bad", [-0.1, "[]", "[0.0,-1]", "many"])
def test_a_bad_router_weight_decay_is_a_one_line_error(bad):
    from omegaconf import OmegaConf

    from ihas_lightning.errors import ConfigError
    from ihas_lightning.stages.cluster import router_weight_decays

    rc = OmegaConf.create(f"weight_decay: {bad}")
    with pytest.raises(ConfigError, match="'cluster.router.weight_decay'"):
        router_weight_decays(rc)
    assert router_weight_decays(OmegaConf.create("weight_decay: 0.01")) == [0.01]
    assert router_weight_decays(OmegaConf.create("weight_decay: [0, 1e-3]")) == [0.0, 0.001]


def test_one_fit_of_every_weight_decay_equals_a_fit_each():
    """RouterModule with a list of weight decays: each head ends where its own fit ends (the same
    batches; the summed loss gives each head its own gradient)."""
    from ihas_lightning.models import DLRM
    from ihas_lightning.modules.router import RouterModule, embedding_stats

    torch.manual_seed(0)
    vocab = [9, 4, 13]
    search = DLRM(vocab, 8, gate={}).eval()
    x = torch.stack([torch.randint(0, v, (512,)) for v in vocab], 1)
    c = (x[:, 0] % 3).long()
    mean, std = embedding_stats(search.embedding, x, batch_size=100)
    decays = [0.0, 0.01, 0.1]

    def fit(wd):
        m = RouterModule(vocab, 3, lr=0.05, features="embedding", embedding=search.embedding, mean=mean, std=std,
                         weight_decay=wd)  # fmt: skip
        opt = m.configure_optimizers()
        for i in range(0, 512, 64):
            opt.zero_grad()
            logits = m.all_logits(x[i : i + 64])
            torch.stack(
                [torch.nn.functional.cross_entropy(lg, c[i : i + 64]) for lg in logits]
            ).sum().backward()
            opt.step()
        return m

    together = fit(decays)
    for h, wd in enumerate(decays):
        alone = fit(wd)
        torch.testing.assert_close(together.heads[h].weight, alone.head.weight, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(together.distilled(h)(x), alone.distilled()(x), rtol=1e-5, atol=1e-5)
    # the precomputed standardised table gives the standardised embedding
    with torch.no_grad():
        torch.testing.assert_close(together.standardised(x), (search.embed(x) - mean) / std.clamp_min(1e-6))


@pytest.mark.parametrize(("n", "m"), [(10, 10), (10, 25), (7, 3), (5, 40)])
def test_the_router_batches_follow_the_seeded_sampler_exactly(n, m):
    """sampler_order draws what list(RandomSampler) yields, epoch after epoch (the same router fit,
    without a Python int per row)."""
    from torch.utils.data import RandomSampler

    from ihas_lightning.stages.cluster import sampler_order

    ref = RandomSampler(range(n), num_samples=m, generator=torch.Generator().manual_seed(3))
    fast = RandomSampler(range(n), num_samples=m, generator=torch.Generator().manual_seed(3))
    for _ in range(3):  # each epoch moves the generator on as the sampler's own iteration does
        assert sampler_order(fast).tolist() == list(ref)
