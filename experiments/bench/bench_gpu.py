"""``make bench-gpu``: training and routed-inference throughput with the data on the accelerator, and
CPU/accelerator AUC parity, in one prepared script of at most ~5 minutes. Writes
``experiments/results/bench_gpu.json``.

1. **Training samples/s** at Criteo scale (39 fields, ``--ids`` ids, batch 2048 and 8192, fp32
   ``32-true`` and ``bf16-mixed``): Base (``CTRModule``) and the bi-level search (``SearchModule``,
   a gate step every 100 batches) through ``lightning.Trainer`` on a prepared Parquet dir of random
   ids, with ``IHASDataModule(device_resident=True)``: the split lives on the device and a batch is an
   index_select there. Warm-up batches are not timed (``throughput_callback``).
2. **Routed inference rows/s** at batch 8192: Base, routed iHAS (exact routing and the distilled
   router) on a Criteo-shaped model (:func:`experiments.bench.bench_serve.criteo_shaped`).
3. **AUC parity**: ``stage=all`` on the synthetic data on the CPU and on the accelerator (same seed);
   the routed iHAS test AUC must agree within 0.001.

``--accelerator cpu`` runs the same code on the CPU (``make bench-gpu ACCEL=cpu``; ``--quick`` is the
test suite's dry run). The targets (one H100): Base >= 1M samples/s, search >= 400k.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

TARGETS = {"base_samples_per_s": 1_000_000, "search_samples_per_s": 400_000}


def device_name(accelerator: str) -> str:
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def train_throughput(prepared: Path, method: str, batch_size: int, precision: str, accelerator: str,
                     batches: int, warmup: int) -> dict[str, Any]:  # fmt: skip
    import lightning as L

    from ihas_lightning.data.datamodule import IHASDataModule
    from ihas_lightning.data.feature_map import FeatureMap
    from ihas_lightning.modules.ctr import CTRModule
    from ihas_lightning.modules.search import SearchModule
    from ihas_lightning.training import throughput_callback

    from .bench_train import GATE, MODEL

    fm = FeatureMap.load(prepared)
    model = dict(MODEL, embedding_optimizer="sparse_adam")  # the training benchmark's model (paper sizes)
    torch.manual_seed(0)
    dm = IHASDataModule(prepared, batch_size=batch_size, mode="in_memory", device_resident=True)
    if method == "base":
        module = CTRModule(fm.vocab_sizes, model)
    else:
        gate = dict(GATE, lambda_reg=1e-4, lr=1e-3)
        module = SearchModule(fm.vocab_sizes, model, gate, pretrain_epochs=0, search_every=100)
    thr = throughput_callback(skip_batches=warmup)
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_epochs=1, limit_train_batches=batches,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[thr],
    )  # fmt: skip
    if method != "base":  # built in the fit, on the trainer's device (as stage=search does)
        module.set_search_loader(lambda: dm.search_dataloader("val"))
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return {"samples_per_s": round(thr.samples_per_s or 0.0), "timed_batches": thr.batches - warmup,
            "fit_s": round(time.perf_counter() - t0, 2)}  # fmt: skip


@torch.inference_mode()
def routed_throughput(accelerator: str, ids: int, rows: int, batch: int = 8192) -> dict[str, Any]:
    from .bench_serve import criteo_shaped

    dev = torch.device("cuda" if accelerator in ("gpu", "cuda") and torch.cuda.is_available() else "cpu")
    base, routed, x, _ = criteo_shaped(total_ids=ids, rows=rows)
    base, routed, x = base.to(dev), routed.compact().to(dev), x.to(dev)
    fns = {"base": lambda b: base(b, "open"), "ihas_exact": routed.forward}
    if routed.router is not None:
        fast = routed.with_fast_routing()
        fns["ihas_fast"] = fast.forward
    out = {}
    chunks = list(x.split(batch))
    for name, fn in fns.items():
        for b in chunks[:2]:
            fn(b)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in chunks:
            fn(b)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out[name] = round(len(x) / (time.perf_counter() - t0))
    return {"batch": batch, "rows": len(x), "rows_per_s": out}


def auc_parity(accelerator: str, tmp: Path, quick: bool) -> dict[str, Any]:
    from ihas_lightning.config import compose
    from ihas_lightning.pipeline import run as run_all
    from ihas_lightning.utils import read_json

    extra = ["search.max_epochs=1", "search.pretrain.max_epochs=1", "search.pretrain.patience=null",
             "search.search_every=2", "retrain.max_epochs=1", "dataset.rows=3000"] if quick else []  # fmt: skip
    res = {}
    for acc in ("cpu", accelerator) if accelerator != "cpu" else ("cpu", "cpu_device_path"):
        over = ["stage=all", "logger=none", f"paths.data_dir={tmp / 'data'}", "trainer.enable_progress_bar=false",
                "evaluate.timing_repeats=1", *extra]  # fmt: skip
        if acc == "cpu_device_path":  # the CPU dry run: the device-resident code path on the CPU
            over.append("+dataset.device_resident=true")
        elif acc != "cpu":
            over += [f"trainer.accelerator={acc}"]
        run = tmp / f"parity_{acc}"
        run_all(compose(over, output_dir=run))
        r = read_json(run / "evaluate" / "results.json")
        res[acc] = {row["model"]: row["test_auc"] for row in r["rows"] if row.get("test_auc") is not None}
    a, b = res.values()
    diffs = {m: round(abs(a[m] - b[m]), 6) for m in a if m in b and m != "Constant"}
    return {
        "test_auc": res,
        "abs_diff": diffs,
        "max_abs_diff": max(diffs.values()),
        "within_0.001": max(diffs.values()) <= 1e-3,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accelerator", default="gpu")
    ap.add_argument("--out", default="experiments/results/bench_gpu.json")
    ap.add_argument("--ids", type=int, default=1_000_000)
    ap.add_argument("--rows", type=int, default=2_000_000, help="train rows of the random prepared dir")
    ap.add_argument("--batches", type=int, default=120, help="training batches per measurement")
    ap.add_argument("--quick", action="store_true", help="the tests' dry run: tiny sizes")
    args = ap.parse_args(argv)
    if args.quick:
        args.ids, args.rows, args.batches = 20_000, 20_000, 6
    if args.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise SystemExit("bench-gpu: no CUDA device here; run `make bench-gpu ACCEL=cpu` for the CPU dry run")
    from .bench_loader import write_random_prepared
    from .bench_scale import machine

    t_start = time.perf_counter()
    host = machine()
    print(f"machine: {host['cpu']}, {host['cores']} cores; load average {host['load_average']}; "
          f"device: {device_name(args.accelerator)}", flush=True)  # fmt: skip
    res: dict[str, Any] = {"device": device_name(args.accelerator), "accelerator": args.accelerator,
                           "torch": torch.__version__, "quick": args.quick, "targets": TARGETS, "host": host,
                           "train": []}  # fmt: skip
    precisions = ["32-true", "bf16-mixed"]
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        prepared = tmp / "prepared"
        prepared.mkdir()
        fm = write_random_prepared(prepared, args.rows, fields=39)
        res["ids"], res["train_rows"] = int(sum(fm.vocab_sizes)), args.rows
        for method in ("base", "search"):
            for bs in (2048, 8192):
                n = max(4, min(args.batches, args.rows // bs))
                for prec in precisions:
                    r = train_throughput(
                        prepared, method, bs, prec, args.accelerator, n, warmup=min(10, n // 2)
                    )
                    res["train"].append({"method": method, "batch_size": bs, "precision": prec, **r})
                    print(f"train {method} batch {bs} {prec}: {r['samples_per_s']:,} samples/s", flush=True)
        res["routed_inference"] = routed_throughput(args.accelerator, args.ids, min(args.rows, 262144))
        print(f"routed inference: {res['routed_inference']}", flush=True)
        res["auc_parity"] = auc_parity(args.accelerator, tmp, args.quick)
        print(f"AUC parity: {res['auc_parity']['abs_diff']}", flush=True)
    best = {m: max(r["samples_per_s"] for r in res["train"] if r["method"] == m) for m in ("base", "search")}
    res["best_samples_per_s"] = best
    res["meets_targets"] = {
        "base": best["base"] >= TARGETS["base_samples_per_s"],
        "search": best["search"] >= TARGETS["search_samples_per_s"],
    }
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    res["host_load_average_at_end"] = machine()["load_average"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"-> {out} ({res['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
