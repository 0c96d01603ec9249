"""``make bench-serve``: inference latency and throughput of Base against routed iHAS, side by side in
one process on the same rows, on CPU.

Models, each on the same input ids:

* ``base`` -- the Base model;
* ``ihas_exact`` -- routed iHAS as ``stage=evaluate`` / ``stage=predict`` run it: searched embedding +
  gate (deterministic threshold) -> nearest centroid -> each cluster's rows through its own model
  (:func:`ihas_lightning.routing.dispatch`);
* ``ihas_graph`` -- the exported graph's formulation (:class:`ihas_lightning.serving.ServingModule`:
  every cluster model on the batch, a gather);
* ``ihas_models_only`` -- the cluster models alone, clusters given (what the paper most likely timed);
* ``ihas_fast`` -- routed by the distilled router (:mod:`ihas_lightning.models.router`) instead of the
  searched embedding + gate, the router and the folded cluster models in one lookup
  (:mod:`ihas_lightning.models.fused`, as evaluate / predict / export serve it); ``ihas_fast_unfused``:
  the router's lookup, then each cluster's rows to its own model;
* ``base_folded`` -- Base in the folded serving layout of the cluster models
  (:class:`ihas_lightning.models.compact.FoldedMLP`): the fair reference for the routed rows;
* every ``ihas_*`` row serves the cluster models in their serving layout
  (:func:`ihas_lightning.models.compact.compact`, as evaluate / predict / export do);
  ``ihas_models_only_trained_layout`` / ``ihas_fast_trained_layout`` time the layout they were trained
  in (packed by field size, one lookup per distinct size, a reorder), side by side;
* ``ihas_low_rank_gate_<r>`` -- the exact routing with the gate's weight truncated to rank r by SVD
  (:func:`low_rank_gate`), with its agreement with the exact clusters;
* ``onnx_base`` / ``onnx_base_folded`` / ``onnx_ihas`` / ``onnx_ihas_fast`` -- the exported graphs in onnxruntime (same
  thread count).

Base, Base folded and the fast routing are also timed at batch 4096 with 1 torch thread
(:func:`one_thread`).

At batch 1: p50 / p99 latency over single rows; batch 256: mean ms per batch; batch 4096: rows/s over
the whole set (batch 256 and 4096: the fastest of 3 rounds, each round timing every candidate in
turn). Three sets: the test split of a trained synthetic run (``--run``, else one is trained, ~1 min);
a run trained on ``--criteo-rows`` generated Criteo-format rows (prepared, every fit one epoch; 2M rows
give ~1M ids); and a Criteo-shaped model (39 fields, ``--ids`` ids, untrained weights: timing only) on
random Zipf ids. Writes ``experiments/results/bench_serve.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ihas_lightning.models import DLRM
from ihas_lightning.models.compact import compact
from ihas_lightning.models.router import LinearRouter
from ihas_lightning.routing import RoutedModel, cluster_features, dispatch
from ihas_lightning.serving import ServingModule


def _split(fn: Any) -> tuple[Any, Any]:
    """A candidate is ``fn(batch)`` or ``(prep, run)``: ``prep(batch)`` is done before the clock starts
    (the models-only row: its clusters), ``run(batch, prepped)`` is timed."""
    if isinstance(fn, tuple):
        return fn
    return (lambda b: None), (lambda b, _: fn(b))


def _time(fn: Any, batches: list[torch.Tensor], repeats: int = 3) -> float:
    """Seconds of one pass over ``batches`` (min over repeats, one warm-up batch)."""
    prep, run = _split(fn)
    with torch.inference_mode():
        state = [prep(b) for b in batches]
        run(batches[0], state[0])
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for b, st in zip(batches, state):
                run(b, st)
            best = min(best, time.perf_counter() - t0)
    return best


def _latency(fn: Any, x: torch.Tensor, n: int) -> tuple[float, float]:
    prep, run = _split(fn)
    rows = [x[i : i + 1] for i in range(min(n, len(x)))]
    out = []
    with torch.inference_mode():
        state = [prep(r) for r in rows]
        for r, st in zip(rows[:20], state[:20]):
            run(r, st)
        for r, st in zip(rows, state):
            t0 = time.perf_counter()
            run(r, st)
            out.append(time.perf_counter() - t0)
    return float(np.percentile(out, 50) * 1e3), float(np.percentile(out, 99) * 1e3)


def measure(
    fns: dict[str, Any], x: torch.Tensor, single: int = 300, rounds: int = 3
) -> dict[str, dict[str, float]]:
    """Per candidate: batch-1 latency, then batch 256 and 4096 as the fastest of ``rounds`` rounds, each
    round timing every candidate in turn (a drift of the machine's speed hits every row alike)."""
    res: dict[str, dict[str, float]] = {}
    for name, fn in fns.items():
        p50, p99 = _latency(fn, x, single)
        res[name] = {"b1_p50_ms": round(p50, 4), "b1_p99_ms": round(p99, 4)}
    b256 = [x[i : i + 256] for i in range(0, min(len(x), 256 * 100), 256)]
    b4096 = [x[i : i + 4096] for i in range(0, len(x), 4096)]
    best: dict[str, list[float]] = {name: [float("inf"), float("inf")] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for j, batches in enumerate((b256, b4096)):
                best[name][j] = min(best[name][j], _time(fn, batches, repeats=1))
    for name in fns:
        res[name]["b256_ms"] = round(best[name][0] / len(b256) * 1e3, 4)
        res[name]["b4096_rows_per_s"] = round(len(x) / best[name][1], 1)
        print(f"  {name:18s} " + "  ".join(f"{k} {v:,.3f}" for k, v in res[name].items()), flush=True)
    return res


def _onnx(module: torch.nn.Module, x: torch.Tensor, path: Path):
    import onnxruntime as ort

    torch.onnx.export(module, (x[:8],), str(path), input_names=["x"], output_names=["probability", "cluster"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
                      external_data=False)  # fmt: skip
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda b: sess.run(None, {"x": b.numpy()})


#: timed again at 1 torch thread (batch 4096): does the thread count change the routed / Base ratio?
ONE_THREAD = ("base", "base_folded", "ihas_fast")


def one_thread(fns: dict[str, Any], x: torch.Tensor, rounds: int = 3) -> dict[str, float]:
    """Rows/s at batch 4096 with 1 torch thread (fastest of ``rounds`` rounds, every candidate in turn);
    the thread count is restored after."""
    threads = torch.get_num_threads()
    b4096 = [x[i : i + 4096] for i in range(0, len(x), 4096)]
    best = {name: float("inf") for name in fns}
    torch.set_num_threads(1)
    try:
        for _ in range(rounds):
            for name, fn in fns.items():
                best[name] = min(best[name], _time(fn, b4096, repeats=1))
    finally:
        torch.set_num_threads(threads)
    out = {name: round(len(x) / t, 1) for name, t in best.items()}
    print("  1 thread, batch 4096 rows/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in out.items()), flush=True)
    return out


def candidates(base: DLRM, routed: RoutedModel, x: torch.Tensor, tmp: Path, onnx: bool) -> dict[str, Any]:
    """``routed``: the cluster models as trained (packed by field size); every ``ihas_*`` row serves them
    in their serving layout (:meth:`RoutedModel.compact`, as evaluate / predict / export do), and the
    ``*_trained_layout`` rows time the trained layout side by side."""
    served = routed.compact()
    graph = ServingModule(routed=served).eval()
    base_folded = compact(base)
    fns: dict[str, Any] = {
        "base": lambda b: base(b, "open"),
        "base_folded": lambda b: base_folded(b, "open"),
        "ihas_exact": served.forward,
        "ihas_graph": graph,
    }
    fns["ihas_models_only"] = (served.route, lambda b, c: dispatch(b, c, served.cluster_models))
    fns["ihas_models_only_trained_layout"] = (
        routed.route,
        lambda b, c: dispatch(b, c, routed.cluster_models),
    )
    if routed.router is not None:
        fns["ihas_fast"] = served.with_fast_routing().forward
        unfused = served.with_fast_routing()
        unfused.fused = None  # the router's lookup, then each cluster's rows to its own model
        fns["ihas_fast_unfused"] = unfused.forward
        fns["ihas_fast_trained_layout"] = routed.with_fast_routing().forward
    if routed.search_model.gate.linear.in_features > max(LOW_RANKS):
        for r in LOW_RANKS:
            fns[f"ihas_low_rank_gate_{r}"] = low_rank_gate(served, r).forward
    if onnx:
        fns["onnx_base"] = _onnx(ServingModule(model=base, mode="open").eval(), x, tmp / "base.onnx")
        fns["onnx_base_folded"] = _onnx(ServingModule(model=base_folded, mode="open").eval(), x,
                                        tmp / "base_folded.onnx")  # fmt: skip
        fns["onnx_ihas"] = _onnx(graph, x, tmp / "ihas.onnx")
        if routed.router is not None:
            fns["onnx_ihas_fast"] = _onnx(ServingModule(routed=served.with_fast_routing()).eval(), x,
                                          tmp / "ihas_fast.onnx")  # fmt: skip
    return fns


def low_rank_gate(routed: RoutedModel, rank: int) -> RoutedModel:
    """The exact routing with the gate's N·d x N·d weight replaced by its best rank-``rank``
    approximation (truncated SVD, two thin linear layers), measured for speed and for its agreement
    with the exact clusters. Not a serving option: it keeps the embedding, the threshold search and the
    dispatch, so it stays 15-39x Base folded against the distilled router's 1.4-2x
    (``docs/benchmarks.md``)."""
    import copy

    search = copy.deepcopy(routed.search_model)
    lin = search.gate.linear
    u, s, vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    down = torch.nn.Linear(lin.in_features, rank, bias=False)
    up = torch.nn.Linear(rank, lin.out_features, bias=lin.bias is not None)
    with torch.no_grad():
        down.weight.copy_(vh[:rank])
        up.weight.copy_(u[:, :rank] * s[:rank])
        if lin.bias is not None:
            up.bias.copy_(lin.bias)
    search.gate.linear = torch.nn.Sequential(down, up)
    return RoutedModel(search, routed.centroids, list(routed.cluster_models), routed.input).eval()


LOW_RANKS = (32, 64, 128)


def from_run(run: Path) -> tuple[DLRM, RoutedModel, torch.Tensor, dict[str, Any]]:
    import pyarrow.parquet as pq

    from ihas_lightning.serving import load_run_config, load_run_models

    rm = load_run_models(load_run_config(run))
    if rm.routed is None:
        raise SystemExit(f"{run}: not a routed iHAS run")
    base = rm.entry("base")[2].eval()
    r = rm.routed  # rebuilt with the cluster models as trained (candidates() times both layouts)
    routed = RoutedModel(r.search_model, r.centroids, [m.model.eval() for m in rm.modules], r.input, r.router)
    t = pq.read_table(rm.prepared / "test.parquet")
    x = torch.from_numpy(np.stack([t.column(n).to_numpy() for n in rm.fmap.field_names], 1).astype(np.int64))
    info = {"run": str(run), "fields": rm.fmap.num_fields, "ids": int(sum(rm.fmap.vocab_sizes)), "rows": len(x),
            "clusters": rm.k, "trained": True}  # fmt: skip
    res = run / "evaluate" / "results.json"
    if res.is_file():  # the fast routing's agreement and AUC cost, as evaluate measured them
        info["fast_routing"] = json.loads(res.read_text()).get("fast_routing")
    return base, routed.eval(), x, info


def criteo_shaped(total_ids: int = 1_000_000, rows: int = 65536, k: int = 2, seed: int = 0):
    """A Criteo-shaped Base and routed iHAS with untrained weights (timing only): 13 numeric fields of
    100 values and the 26 categorical fields scaled from the full data's cardinalities to ~total_ids."""
    from ihas_lightning.config import group_defaults
    from ihas_lightning.data.rawgen import CRITEO_CARD

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    scale = (total_ids - 1300) / sum(CRITEO_CARD)
    vocab = [100] * 13 + [max(3, int(c * scale)) for c in CRITEO_CARD]
    gate = {
        k_: v
        for k_, v in group_defaults("method", "ihas", "gate").items()
        if k_ not in ("lr", "weight_decay")
    }
    base = DLRM(vocab, 16).eval()
    search = DLRM(vocab, 16, gate=gate).eval()
    x = torch.from_numpy(
        np.stack([np.minimum(rng.zipf(1.2, rows) - 1, v - 1) for v in vocab], 1).astype(np.int64)
    )
    models = []
    for _ in range(k):  # each cluster keeps about half of the dims, in whole fields and half fields
        dims = rng.choice([0, 8, 16], size=len(vocab), p=[0.3, 0.3, 0.4]).tolist()
        models.append(DLRM(vocab, 16, field_dims=dims).eval())
    with torch.inference_mode():
        feats, _ = cluster_features(search, x[:4096])
    centroids = feats[torch.from_numpy(rng.choice(len(feats), size=k, replace=False))]
    router = LinearRouter(vocab, k)
    torch.nn.init.normal_(router.weight.weight, std=0.1)  # untrained: some rows to each cluster
    routed = RoutedModel(search, centroids, models, router=router).eval()
    info = {"fields": len(vocab), "ids": int(sum(vocab)), "rows": rows, "clusters": k, "trained": False}
    return base, routed, x, info


def criteo_prepared(tmp: Path, rows: int, seed: int = 0) -> Path:
    """A trained routed iHAS run on ``rows`` generated Criteo-format rows (the raw generator, prepared
    with ``min_count=1``, every fit one epoch): the serving set with a realistic vocabulary."""
    from ihas_lightning.config import compose
    from ihas_lightning.data.rawgen import generate
    from ihas_lightning.pipeline import run as run_all

    raw = generate("criteo", rows, tmp / "criteo_gen.txt", seed=seed)
    run = tmp / "criteo_run"
    run_all(compose(["stage=all", "dataset=criteo", f"dataset.raw_path={raw}", "dataset.min_count=1",
                     "logger=none", f"paths.data_dir={tmp / 'data'}", "search.max_epochs=1",
                     "search.pretrain.max_epochs=1", "retrain.max_epochs=1", "trainer.enable_progress_bar=false",
                     "prepare.progress=false", "evaluate.timing_repeats=1", "cluster.router.max_rows=200000"],
                    output_dir=run))  # fmt: skip
    raw.unlink()
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a finished routed iHAS run dir, timed on its test split (default: train one "
                    "on the synthetic data)")  # fmt: skip
    ap.add_argument("--out", default="experiments/results/bench_serve")
    ap.add_argument("--ids", type=int, default=1_000_000)
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--criteo-rows", type=int, default=2_000_000,
                    help="generated Criteo rows for the prepared, trained Criteo set (0: skip it)")  # fmt: skip
    args = ap.parse_args(argv)
    results: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                               "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
                               "sets": {}}  # fmt: skip
    from ihas_lightning.serving import load_run_config

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        run = Path(args.run) if args.run else None
        if run is None:
            from ihas_lightning.config import compose
            from ihas_lightning.pipeline import run as run_all

            run = tmp / "run"
            run_all(compose(["stage=all", "logger=none", f"paths.data_dir={tmp / 'data'}",
                             "trainer.enable_progress_bar=false", "prepare.progress=false"], output_dir=run))  # fmt: skip
        # --run: that run's test split, named after its dataset (else the default synthetic run)
        sets = {"synthetic" if not args.run else f"run_{load_run_config(run).dataset.name}": from_run(run)}
        if args.criteo_rows:
            sets["criteo_generated"] = from_run(criteo_prepared(tmp, args.criteo_rows))
        sets["criteo_shaped"] = criteo_shaped(args.ids)
        for name, (base, routed, x, info) in sets.items():
            print(f"{name}: {info}", flush=True)
            fns = candidates(base, routed, x, tmp, onnx=not args.no_onnx)
            res = measure(fns, x)
            with torch.inference_mode():
                exact = torch.cat([routed.route(b) for b in x.split(4096)])
                for m in [m for m in fns if m.startswith("ihas_low_rank_gate_")]:
                    r_ = fns[m].__self__  # the candidate's routed model (its bound forward)
                    info.setdefault("low_rank_gate_agreement", {})[m] = round(
                        float((torch.cat([r_.route(b) for b in x.split(4096)]) == exact).float().mean()), 4
                    )
            one = one_thread({k_: fns[k_] for k_ in ONE_THREAD if k_ in fns}, x)
            r = res["ihas_exact"]["b4096_rows_per_s"]
            ratio, ratio_folded = ({k_: round(res[b]["b4096_rows_per_s"] / v["b4096_rows_per_s"], 2)
                                    for k_, v in res.items()} for b in ("base", "base_folded"))  # fmt: skip
            results["sets"][name] = {
                **info,
                "results": res,
                "time_vs_base_b4096": ratio,
                "time_vs_base_folded_b4096": ratio_folded,
                "ihas_exact_rows_per_s": r,
                "one_thread_b4096_rows_per_s": one,
            }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(results, indent=1) + "\n")
    md = [f"# Serving benchmark ({results['machine']}, torch {results['torch']})", "",
          "Time relative to Base at batch 4096 (whole set): `time x` = Base rows/s / model rows/s, against Base",
          "as trained (`x Base`) and against Base in the same folded serving layout as the cluster models",
          "(`x Base folded`, the fair reference: every serving optimisation applied to both sides).",
          "Batch 256 and 4096: the fastest of 3 rounds, each round timing every model in turn.", ""]  # fmt: skip
    for name, s in results["sets"].items():
        md += [f"## {name}: {s['fields']} fields, {s['ids']:,} ids, {s['rows']:,} rows, {s['clusters']} clusters"
               + ("" if s["trained"] else " (untrained weights: timing only)"), "",
               "| model | batch 1 p50 ms | batch 1 p99 ms | batch 256 ms | batch 4096 rows/s | time x Base | "
               "time x Base folded |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for m, v in s["results"].items():
            md.append(f"| {m} | {v['b1_p50_ms']:.3f} | {v['b1_p99_ms']:.3f} | {v['b256_ms']:.3f} | "
                      f"{v['b4096_rows_per_s']:,.0f} | {s['time_vs_base_b4096'][m]:.2f} | "
                      f"{s['time_vs_base_folded_b4096'][m]:.2f} |")  # fmt: skip
        one = s.get("one_thread_b4096_rows_per_s") or {}
        if "base_folded" in one and "ihas_fast" in one:
            md += ["", "At 1 torch thread (batch 4096): " + ", ".join(f"{k} {v:,.0f} rows/s" for k, v in one.items())
                   + f"; ihas_fast time x Base folded {one['base_folded'] / one['ihas_fast']:.2f}."]  # fmt: skip
        lr = s.get("low_rank_gate_agreement")
        if lr:
            md += ["", "Low-rank gate (exact routing with the gate's weight truncated by SVD), agreement with the exact "
                   "assignment on this set: " + ", ".join(f"rank {k.rsplit('_', 1)[1]} {v:.3f}" for k, v in lr.items())
                   + "."]  # fmt: skip
        fr = s.get("fast_routing")
        if fr:
            ci = fr.get("test_auc_minus_exact_ci95") or [None, None]
            md.append("")
            md.append(f"Fast routing (evaluate on this run's test split): agreement with the exact assignment "
                      f"{fr['agreement_test']:.3f}, test AUC {fr['test_auc_minus_exact']:+.6f} against the exact "
                      "routing" + ("" if ci[0] is None else
                                   f" (95% CI [{ci[0]:+.6f}, {ci[1]:+.6f}]; within 0.001: {fr.get('test_within_0.001')})")
                      + ".")  # fmt: skip
        md.append("")
    Path(f"{out}.md").write_text("\n".join(md))
    print(f"-> {out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
