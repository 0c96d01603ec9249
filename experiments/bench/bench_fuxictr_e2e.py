"""``make bench-fuxictr-e2e``: one training epoch of Base as each library's user runs it, ours against
FuxiCTR's, quiet and with one core busy (issue 15's own measurement: the epoch, loader included).

* **Ours**: ``python -m ihas_lightning stage=search method=base search.max_epochs=1 dataset=criteo`` on
  ``--rows`` generated Criteo-format rows prepared once by ``stage=prepare`` (the Parquet DataModule,
  ``lightning.Trainer``, the CLI's callbacks), at ``trainer.threads=auto`` (the default) and ``=1``;
  samples/s is the fit's own (``search/metrics.json``: each batch's fetch to the end of its step).
* **FuxiCTR** (2.3.10, the ``compare`` extra): the same prepared train rows in its ``npz`` format (one
  array per column, what its ``FeatureProcessor`` writes), read by its ``RankDataLoader`` (for an npz
  file its ``NpzDataLoader``: batch 2048, shuffled, its default one worker) and trained by its ``BaseModel.train_epoch`` (the loop of ``fit``;
  the end-of-epoch evaluation is not run) on its model zoo's DNN composition with our sizes
  (:func:`.bench_fuxictr.fuxictr_dnn`), at torch's default thread count (all usable cores) and 1.
  Samples/s over the same span as ours: from the end of the warm-up batches to the end of the epoch,
  fetches included.

Each load runs ``--rounds`` rounds, the order of the four runs reversed every other round; a cell is the
median of its rounds, and each round's ours / FuxiCTR ratio (its faster setting) is reported.
Writes ``experiments/results/bench_fuxictr_e2e.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import save_results
from .bench_alloc import generated_criteo, run_search
from .bench_fuxictr import fuxictr_dnn
from .bench_load import Load
from .bench_train import RESULTS

WARMUP = 5


def ours(common: list[str], threads: str, out: Path) -> float:
    """Samples/s of one ``stage=search method=base`` epoch through the CLI (its own process)."""
    run = run_search(["method=base", "search.max_epochs=1", f"trainer.threads={threads}", *common], out)
    return float(run["samples_per_s"])


class _Timed:
    """FuxiCTR's data generator, noting the time when batch ``WARMUP`` is requested (the warm-up
    batches' steps are done) and the rows from then on."""

    def __init__(self, gen):
        self.gen, self.t0, self.samples = gen, None, 0

    def __len__(self) -> int:
        return len(self.gen)

    def __iter__(self):
        it = iter(self.gen)
        for i in range(len(self.gen)):
            if i == WARMUP:
                self.t0 = time.perf_counter()
            batch = next(it)
            if i >= WARMUP:
                self.samples += int(batch["label"].shape[0])
            yield batch


def fuxictr_epoch(vocab: list[int], npz: str, threads: int, workdir: str) -> float:
    """Samples/s of FuxiCTR's train_epoch over its NpzDataLoader on ``npz``."""
    from fuxictr.pytorch.dataloaders import RankDataLoader

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = fuxictr_dnn(vocab, workdir)
    train, _ = RankDataLoader(
        model.feature_map, stage="train", train_data=npz, batch_size=2048, shuffle=True, data_format="npz"
    )  # fmt: skip  (a file path: its NpzDataLoader)
    gen = _Timed(train)
    # what fit() sets before its epochs; no evaluation inside the epoch
    model._max_gradient_norm, model._total_steps, model._epoch_index = 10.0, 0, 0
    model._steps_per_epoch, model._eval_steps, model._stop_training = len(gen), 10**12, False
    model.train_epoch(gen)
    return gen.samples / (time.perf_counter() - gen.t0)


def write_npz(prepared: Path, path: Path) -> list[int]:
    """The prepared train split as FuxiCTR's npz (columns f0..f{F-1}, label); the vocabulary sizes."""
    import pyarrow.parquet as pq

    from ihas_lightning.utils import read_json

    fmap = read_json(prepared / "feature_map.json")
    names = [f["name"] for f in fmap["fields"]]
    t = pq.read_table(prepared / "train.parquet")
    cols = {f"f{i}": t.column(n).to_numpy().astype(np.int64) for i, n in enumerate(names)}
    cols["label"] = t.column(fmap.get("label", "label")).to_numpy().astype(np.float32)
    np.savez(path, **cols)
    return [int(f["vocab_size"]) for f in fmap["fields"]]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--rows", type=int, default=800_000, help="generated Criteo-format rows (the issue's 800k)"
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--loads", nargs="*", default=["quiet", "one core busy"])
    ap.add_argument("--out", default=str(RESULTS / "bench_fuxictr_e2e"))
    args = ap.parse_args(argv)
    try:
        import fuxictr
    except ImportError:
        raise SystemExit(
            "bench_fuxictr_e2e: FuxiCTR is not installed (make bench-fuxictr installs it)"
        ) from None
    warnings.filterwarnings("ignore")
    from ihas_lightning.allocator import tune
    from ihas_lightning.threads import usable_cores

    tune()  # FuxiCTR's process gets the same malloc settings as ours
    cores = usable_cores()
    t_start = time.perf_counter()
    runs: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        common = generated_criteo(work, args.rows)
        prepared = work / "data" / "criteo"
        vocab = write_npz(prepared, work / "train.npz")
        train_rows = int(np.load(work / "train.npz")["label"].shape[0])
        settings = ["ours (auto)", "ours (1 thread)", f"fuxictr ({cores} threads)", "fuxictr (1 thread)"]
        n = 0
        for load in args.loads:
            cell = runs.setdefault(load, {})
            with Load(load != "quiet"):
                for r in range(args.rounds):
                    for s in settings if r % 2 == 0 else settings[::-1]:
                        n += 1
                        if s.startswith("ours"):
                            sps = ours(common, "auto" if "auto" in s else "1", work / f"r{n}")
                        else:
                            sps = fuxictr_epoch(
                                vocab, str(work / "train.npz"), 1 if "(1 " in s else cores, td
                            )
                        cell.setdefault(s, []).append(sps)
                        print(f"{load} {s}: {sps:,.0f} samples/s", flush=True)
            torch.set_num_threads(cores)
    cells = {}
    for load, c in runs.items():
        fx = [max(a, b) for a, b in zip(c[settings[2]], c[settings[3]])]
        cells[load] = {
            **{s: round(statistics.median(v)) for s, v in c.items()},
            "ours (auto) / fuxictr (faster), per round": [
                round(a / b, 2) for a, b in zip(c[settings[0]], fx)
            ],
        }
    res = {"cores": cores, "torch": torch.__version__, "fuxictr": fuxictr.__version__, "rows": args.rows,
           "train_rows": train_rows, "ids": int(sum(vocab)), "batch": 2048, "rounds": args.rounds,
           "settings": settings, "cells": cells, "runs": {k: {s: [round(x) for x in v] for s, v in c.items()}
                                                          for k, c in runs.items()},
           "seconds": round(time.perf_counter() - t_start, 1)}  # fmt: skip
    save_results(args.out, res, markdown(res))
    return res


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    md = [f"# One epoch of Base as users run it: ours vs FuxiCTR {r['fuxictr']} ({r['cores']} usable cores, "
          f"torch {r['torch']})", "",
          f"{r['rows']:,} generated Criteo-format rows ({r['train_rows']:,} train rows, {r['ids']:,} ids), batch "
          f"{r['batch']}. Ours: `python -m ihas_lightning stage=search method=base` (Parquet DataModule, Lightning). "
          "FuxiCTR: its `NpzDataLoader` and `train_epoch` on its DNN. Samples/s from the end of the warm-up "
          f"batches to the end of the epoch, fetches included; median of {r['rounds']} rounds (order reversed "
          "every other round).", "",
          "| load | " + " | ".join(s) + " | ours (auto) / FuxiCTR (faster), per round |",
          "|---" * (len(s) + 2) + "|"]  # fmt: skip
    for load, c in r["cells"].items():
        ratios = ", ".join(f"{x:.1f}" for x in c["ours (auto) / fuxictr (faster), per round"])
        md.append(f"| {load} | " + " | ".join(f"{c[k]:,}" for k in s) + f" | {ratios} |")
    md += ["", f"{r['seconds']:.0f} s.", ""]
    return "\n".join(md)


if __name__ == "__main__":
    main()
