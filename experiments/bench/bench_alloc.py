"""``make bench-train-alloc``: ``trainer.malloc_tuning`` on vs off, side by side on the CLI path (issue 15).

It generates ``--rows`` raw Criteo-format rows (1M rows give ~34k ids after ``min_count=10``), prepares
them once, then runs ``python -m ihas_lightning stage=search`` as a user does (one epoch; Base, and the
iHAS search with one pretrain epoch) with ``trainer.malloc_tuning=true`` and ``=false``, alternating
which goes first in each of ``--rounds`` rounds, quiet and with one core kept busy by a spinning process
(started and stopped here, as in ``bench_load``). Each run reports the fit's ``samples_per_s`` and the
minor page faults of the whole process (``getrusage`` of the child). The settings are process-wide, so
each run is its own process. Writes ``experiments/results/bench_train_alloc.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import save_results
from .bench_load import Load
from .bench_train import RESULTS

METHODS = {
    "base": ["method=base", "search.max_epochs=1"],
    "ihas_search": ["method=ihas", "search.pretrain.max_epochs=1", "search.max_epochs=1"],
}


def generated_criteo(work: Path, rows: int) -> list[str]:
    """``rows`` generated Criteo-format rows prepared once by ``stage=prepare`` under ``work``; the
    overrides that point a run at them (prepared data in ``work/data/criteo``)."""
    from ihas_lightning.data.rawgen import generate

    raw = generate("criteo", rows, work / "criteo_gen.txt")
    common = [
        "dataset=criteo", f"dataset.raw_path={raw}", f"paths.data_dir={work / 'data'}", "logger=none",
        "trainer.enable_progress_bar=false", "prepare.progress=false", "seed=0",
    ]  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "ihas_lightning", "stage=prepare", *common, f"paths.output_dir={work / 'p'}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return common


def run_search(overrides: list[str], out: Path) -> dict[str, Any]:
    """One ``stage=search`` process: (samples/s of the fit, minor faults of the process)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    cmd = [sys.executable, "-m", "ihas_lightning", "stage=search", *overrides, f"paths.output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    m = json.loads((out / "search" / "metrics.json").read_text())
    return {"samples_per_s": m["samples_per_s"], "minor_faults": faults, "train_samples": m["train_samples"]}


def summarize(cells: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per cell: medians, and the tuned / untuned ratio of each round's pair (the two runs of a pair are
    seconds apart; this machine's speed drifts by up to 1.5x over minutes, so pairs, not medians of all
    runs, are compared)."""
    rows = {}
    for key, by in cells.items():
        pairs = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(by["true"], by["false"])]
        rows[key] = {
            "samples_per_s_median": {
                t: statistics.median(x["samples_per_s"] for x in v) for t, v in by.items()
            },
            "minor_faults_median": {
                t: statistics.median(x["minor_faults"] for x in v) for t, v in by.items()
            },
            "pair_ratios": [round(r, 3) for r in pairs],
            "tuned_vs_untuned": round(statistics.median(pairs), 3),
            "runs": by,
        }
    return rows


def markdown(res: dict[str, Any]) -> str:
    md = [f"# glibc malloc thresholds on vs off ({res['machine']}, torch {res['torch']})", "",
          f"`python -m ihas_lightning stage=search dataset=criteo` on {res['rows']:,} generated rows "
          f"({res['ids']:,} ids), one epoch (iHAS: one pretrain + one search epoch), `trainer.malloc_tuning=true|false` "
          f"back to back, the order alternated, {res['rounds']} rounds. `tuned / untuned`: the median of the rounds' "
          "paired ratios (each round's ratio in brackets). Minor faults: the whole process, start-up included "
          "(median).", "",
          "| method / load | samples/s tuned (median) | untuned (median) | tuned / untuned | minor faults tuned | untuned |",
          "|---|---|---|---|---|---|"]  # fmt: skip
    for key, c in res["cells"].items():
        s, f = c["samples_per_s_median"], c["minor_faults_median"]
        pr = ", ".join(f"{r:.2f}" for r in c["pair_ratios"])
        md.append(f"| {key} | {s['true']:,.0f} | {s['false']:,.0f} | {c['tuned_vs_untuned']:.2f} ({pr}) | "
                  f"{f['true']:,.0f} | {f['false']:,.0f} |")  # fmt: skip
    md += ["", f"{res['seconds']} s.", ""]
    return "\n".join(md)


def rewrite(json_path: str = str(RESULTS / "bench_train_alloc.json")) -> None:
    """Re-render the JSON's summary and .md (after a change of the report)."""
    res = json.loads(Path(json_path).read_text())
    res["cells"] = summarize({k: c["runs"] for k, c in res["cells"].items()})
    save_results(Path(json_path).with_suffix(""), res, markdown(res))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--loads", nargs="*", default=["quiet", "one core busy"])
    ap.add_argument("--out", default=str(RESULTS / "bench_train_alloc"))
    args = ap.parse_args(argv)

    from ihas_lightning.utils import read_json

    t_start = time.time()
    cells: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        common = generated_criteo(work, args.rows)
        fmap = read_json(work / "data" / "criteo" / "feature_map.json")
        ids = int(sum(f["vocab_size"] for f in fmap["fields"]))
        n = 0
        for load in args.loads:
            with Load(load != "quiet"):
                for r in range(args.rounds):
                    order = ["true", "false"] if r % 2 == 0 else ["false", "true"]
                    for meth in args.methods:
                        for tuning in order:
                            n += 1
                            res = run_search(
                                [*common, *METHODS[meth], f"trainer.malloc_tuning={tuning}"], work / f"r{n}"
                            )
                            key = f"{meth}/{load}"
                            cells.setdefault(key, {}).setdefault(tuning, []).append(res)
                            print(f"{key} malloc_tuning={tuning}: {res['samples_per_s']:,.0f} samples/s, "
                                  f"{res['minor_faults']:,} minor faults", flush=True)  # fmt: skip
    res = {
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} usable cores, CPU",
        "torch": torch.__version__, "rows": args.rows, "ids": ids, "rounds": args.rounds,
        "cells": summarize(cells), "seconds": round(time.time() - t_start),
    }  # fmt: skip
    save_results(args.out, res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
