"""Loader throughput of :class:`~ihas_lightning.data.datamodule.IHASDataModule` (rows/s of a train epoch).

Measures one full training epoch (shuffled whole batches, consumed but not trained on) in the
``in_memory`` mode and in the ``streaming`` mode with 0 and 2 DataLoader workers. Without a prepared
directory it writes a Criteo-shaped one (13 ``I`` + 26 ``C`` fields of random ids, row groups of
131072 rows) to a temporary directory first. ``bench_data`` stores the result; run alone::

    python -m experiments.bench.bench_loader [--rows 2000000] [--fields 39] [--prepared-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ihas_lightning.data.feature_map import LABEL, FeatureMap, Field


def write_random_prepared(
    out_dir: Path, rows: int, fields: int = 39, row_group_size: int = 131072, seed: int = 0
) -> FeatureMap:
    """A prepared dir of uniform random ids: ``rows`` train rows, ``rows // 20`` val/test rows each."""
    rng = np.random.default_rng(seed)
    n_num = min(13, fields)
    names = [f"I{i + 1}" for i in range(n_num)] + [f"C{i + 1}" for i in range(fields - n_num)]
    vocab = [int(v) for v in rng.integers(20, 120, n_num)]
    vocab += [int(round(np.exp(v))) for v in rng.uniform(np.log(10), np.log(1_000_000), fields - n_num)]
    splits: dict[str, dict[str, Any]] = {}
    for split, n in (("train", rows), ("val", max(rows // 20, 1)), ("test", max(rows // 20, 1))):
        cols = {name: pa.array(rng.integers(0, v, n, dtype=np.int32)) for name, v in zip(names, vocab)}
        label = (rng.random(n) < 0.25).astype(np.int8)
        cols[LABEL] = pa.array(label)
        pq.write_table(pa.table(cols), out_dir / f"{split}.parquet", row_group_size=row_group_size)
        splits[split] = {"rows": n, "pos_rate": float(label.mean()), "file": f"{split}.parquet"}
    fm = FeatureMap(
        dataset="bench-random",
        fields=[Field(name=nm, vocab_size=v) for nm, v in zip(names, vocab)],
        min_count=1,
        splits=splits,
        row_group_size=row_group_size,
    )
    fm.save(out_dir)
    return fm


def _epoch(dm: Any) -> dict[str, Any]:
    loader = dm.train_dataloader()
    t0 = time.perf_counter()
    n = nb = 0
    for _x, y in loader:
        n += len(y)
        nb += 1
    dt = time.perf_counter() - t0
    return {"rows": n, "batches": nb, "epoch_s": round(dt, 3), "rows_per_s": round(n / dt)}


def bench_loader(
    prepared_dir: Path | None = None,
    rows: int = 2_000_000,
    fields: int = 39,
    batch_size: int = 2048,
    epochs: int = 2,
) -> dict[str, Any]:
    """rows/s of a full train epoch per loader setting (best of ``epochs`` epochs)."""
    from ihas_lightning.data.datamodule import IHASDataModule

    with tempfile.TemporaryDirectory(prefix="ihas-bench-loader-") as tmp:
        generated = prepared_dir is None
        if prepared_dir is None:
            prepared_dir = Path(tmp)
            t0 = time.perf_counter()
            write_random_prepared(prepared_dir, rows, fields)
            gen_s = time.perf_counter() - t0
        fm = FeatureMap.load(prepared_dir)
        out: dict[str, Any] = {
            "prepared_dir": None if generated else str(prepared_dir),
            "generated": generated,
            "train_rows": fm.rows("train"),
            "fields": fm.num_fields,
            "batch_size": batch_size,
            "cpu_count": os.cpu_count(),
            "results": {},
        }
        if generated:
            out["generate_s"] = round(gen_s, 3)
        for label, mode, workers in (
            ("in_memory", "in_memory", 0),
            ("streaming_w0", "streaming", 0),
            ("streaming_w2", "streaming", 2),
        ):
            dm = IHASDataModule(prepared_dir, batch_size=batch_size, mode=mode, num_workers=workers)
            dm.setup("fit")
            res: dict[str, Any] = {"mode": mode, "num_workers": workers}
            if mode == "in_memory":
                t0 = time.perf_counter()
                dm.split_arrays("train")
                load_s = time.perf_counter() - t0
                res["load_s"] = round(load_s, 3)
                res["load_rows_per_s"] = round(fm.rows("train") / load_s)
            runs = [_epoch(dm) for _ in range(max(epochs, 1))]
            best = max(runs, key=lambda r: r["rows_per_s"])
            res.update(best)
            res["epochs_rows_per_s"] = [r["rows_per_s"] for r in runs]
            out["results"][label] = res
            del dm
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], prog="python -m experiments.bench.bench_loader"
    )
    ap.add_argument("--prepared-dir", type=Path, default=None)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--fields", type=int, default=39)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args(argv)
    res = bench_loader(a.prepared_dir, rows=a.rows, fields=a.fields, batch_size=a.batch_size, epochs=a.epochs)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
