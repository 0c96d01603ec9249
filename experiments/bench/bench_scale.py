"""``make bench-scale``: the whole iHAS pipeline on generated Criteo-format rows, timed stage by stage
and extrapolated to full Criteo (45.8M rows).

It generates ``--rows`` raw Criteo rows with realistic cardinalities (:mod:`ihas_lightning.data.rawgen`)
and runs the command a user runs, in its own process::

    python -m ihas_lightning stage=all dataset=criteo dataset.raw_path=<rows> dataset.loader_mode=streaming \
        search.pretrain.max_epochs=1 search.max_epochs=1 retrain.max_epochs=1

(the paper's 80/10/10 split and ``min_count=10``; the data streamed from Parquet as a full-size run
streams it; everything else at its defaults). While it runs, the child's resident memory is sampled
from ``/proc`` every 0.2 s and attributed to the stage in progress (from the pipeline's
``stage=all: <stage> done`` lines); each stage's wall time comes from the run's ``pipeline.json``.

Extrapolation to 45.8M rows is linear in rows per epoch (every stage streams; none holds the raw data
or all masked embeddings). Each early-stopped fit runs at least ``patience + 1`` epochs (it stops
after ``patience`` epochs without improvement), so the full-data estimate is given per epoch and at
that fewest number of epochs, which is what a converging run on full Criteo does when its first
epochs are its best (CTR models on Criteo usually peak in epoch 1-2). The search stage's time is
split evenly between its pretraining and its search epoch (a search epoch costs more: an upper bound
for the pretraining, a lower bound for the search). Writes ``experiments/results/bench_scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import save_results

FULL_CRITEO_ROWS = 45_840_617
STAGES = ("prepare", "base", "search", "cluster", "retrain", "evaluate")
DONE = re.compile(r"stage=all: (\w+) done in")


def _rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and its children (loader workers), KiB; 0 once it has exited."""
    total = 0
    try:
        pids = [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def run_pipeline(overrides: list[str], log_path: Path) -> tuple[dict[str, int], int, float]:
    """Run ``stage=all`` in a child process: (peak RSS KiB per stage, peak RSS KiB overall, seconds)."""
    cmd = [sys.executable, "-m", "ihas_lightning", "stage=all", *overrides]
    peaks = dict.fromkeys(STAGES, 0)
    current = {"i": 0}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each stage's "done" line as it happens
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
        )

        def sample() -> None:
            while proc.poll() is None:
                rss = _rss_kib(proc.pid)
                name = STAGES[min(current["i"], len(STAGES) - 1)]
                peaks[name] = max(peaks[name], rss)
                time.sleep(0.2)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            m = DONE.search(line)
            if m and m.group(1) in STAGES:
                current["i"] = STAGES.index(m.group(1)) + 1
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        th.join()
    if proc.returncode != 0:
        raise SystemExit(f"stage=all failed (exit {proc.returncode}); see {log_path}")
    return peaks, int(usage.ru_maxrss), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5_000_000, help="generated Criteo rows (default 5M)")
    ap.add_argument("--out", default="experiments/results/bench_scale")
    ap.add_argument("--work", default=None, help="work dir (default: a temp dir, removed at the end)")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for stage=all")
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    from ihas_lightning.config import compose
    from ihas_lightning.data.rawgen import generate
    from ihas_lightning.utils import read_json

    with tempfile.TemporaryDirectory() as td:
        work = Path(args.work) if args.work else Path(td)
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        raw = generate("criteo", args.rows, work / "criteo_gen.txt")
        gen_s = time.perf_counter() - t
        raw_bytes = raw.stat().st_size
        print(f"generated {args.rows:,} rows ({raw_bytes / 2**20:,.0f} MiB) in {gen_s:.0f} s", flush=True)
        run = work / "run"
        bench_epochs = {"search.pretrain.max_epochs": 1, "search.max_epochs": 1, "retrain.max_epochs": 1}
        overrides = [
            "dataset=criteo", f"dataset.raw_path={raw}", "+dataset.loader_mode=streaming", "logger=none",
            f"paths.data_dir={work / 'data'}", f"paths.output_dir={run}", "trainer.enable_progress_bar=false",
            "prepare.progress=false", *[f"{k}={v}" for k, v in bench_epochs.items()], *args.extra,
        ]  # fmt: skip
        peaks, peak_all, wall = run_pipeline(overrides, work / "stage_all.log")
        seconds = {k: v["seconds"] for k, v in read_json(run / "pipeline.json")["stages"].items()}
        fmap = read_json(work / "data" / "criteo" / "feature_map.json")
        cfg = compose(["stage=all", "dataset=criteo"], output_dir=work / "defaults")
        train_rows = int(fmap["splits"]["train"]["rows"])

    # ---- the full-data estimate ------------------------------------------------------------------
    scale = FULL_CRITEO_ROWS / args.rows
    pre = OmegaConf.select(cfg, "search.pretrain")
    fewest = {  # epochs an early-stopped fit runs at the least (patience + 1), per fit
        "base": int(cfg.search.patience) + 1,
        "pretrain": int(pre.patience) + 1 if pre.patience is not None else int(pre.max_epochs),
        "search": int(cfg.search.patience) + 1,
        "retrain": int(cfg.retrain.patience) + 1,
    }
    per_epoch = {
        "prepare": seconds["prepare"] * scale,
        "base": seconds["base"] * scale,
        "pretrain": seconds["search"] / 2 * scale,
        "search": seconds["search"] / 2 * scale,
        "cluster": seconds["cluster"] * scale,
        "retrain": seconds["retrain"] * scale,
        "evaluate": seconds["evaluate"] * scale,
    }
    full = {k: v * fewest.get(k, 1) for k, v in per_epoch.items()}
    res: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
        "rows": args.rows, "raw_mib": round(raw_bytes / 2**20, 1), "generate_s": round(gen_s, 1),
        "train_rows": train_rows, "ids": int(sum(f["vocab_size"] for f in fmap["fields"])),
        "fields": len(fmap["fields"]), "overrides": overrides[3:], "wall_s": round(wall, 1),
        "stages": {
            k: {"seconds": seconds.get(k), "peak_rss_mib": round(peaks[k] / 1024, 1),
                "rows_per_s": round((args.rows if k == "prepare" else train_rows) / seconds[k])}
            for k in STAGES if k in seconds
        },
        "peak_rss_mib": round(peak_all / 1024, 1),
        "full_criteo": {
            "rows": FULL_CRITEO_ROWS, "scale": round(scale, 3), "fewest_epochs": fewest,
            "per_epoch_h": {k: round(v / 3600, 3) for k, v in per_epoch.items()},
            "at_fewest_epochs_h": {k: round(v / 3600, 3) for k, v in full.items()},
            "total_h": round(sum(full.values()) / 3600, 2),
            "target_h": 3.0,
        },
        "peak_rss_target_mib": 8 * 1024,
    }  # fmt: skip
    save_results(args.out, res, markdown(res))
    return 0


def rewrite_markdown(json_path: str = "experiments/results/bench_scale.json") -> None:
    """Re-render the .md beside a bench_scale JSON (after a change of the report's text)."""
    res = json.loads(Path(json_path).read_text())
    Path(json_path).with_suffix(".md").write_text(markdown(res))


def markdown(r: dict[str, Any]) -> str:
    f = r["full_criteo"]
    md = [f"# The pipeline at scale ({r['machine']})", "",
          f"`stage=all` on {r['rows']:,} generated Criteo rows ({r['raw_mib']:,} MiB raw; {r['train_rows']:,} train "
          f"rows, {r['ids']:,} ids after min_count 10), one epoch per fit, data streamed from Parquet: "
          f"{r['wall_s']:,} s wall. Generating the rows took {r['generate_s']} s (not in the pipeline).", "",
          "| stage | seconds | train rows/s (prepare: raw rows/s) | peak RSS MiB |", "|---|---|---|---|"]  # fmt: skip
    for k, s in r["stages"].items():
        md.append(f"| {k} | {s['seconds']:.1f} | {s['rows_per_s']:,} | {s['peak_rss_mib']:,.0f} |")
    ok_rss = "meets" if r["peak_rss_mib"] <= r["peak_rss_target_mib"] else "misses"
    ok_t = "meets" if f["total_h"] <= f["target_h"] else "misses"
    eval_rows = r["rows"] - r["train_rows"]
    eval_full_gib = eval_rows * f["scale"] * r["fields"] * 4 / 2**30
    md += ["", f"Peak RSS of the whole run: {r['peak_rss_mib']:,.0f} MiB ({ok_rss} the 8 GiB target at this size). "
           "Prepare, the fits and the cluster stage stream the data (the cluster stage holds one batch of masked "
           "embeddings at a time); evaluate holds the val and test ids in memory (int32): "
           f"{eval_rows * r['fields'] * 4 / 2**20:,.0f} MiB here, {eval_full_gib:.1f} GiB on full Criteo, so its peak "
           f"there is about {r['stages']['evaluate']['peak_rss_mib'] / 1024 + eval_full_gib:.1f} GiB. The generated "
           f"vocabulary ({r['ids']:,} ids after min_count 10) is smaller than full Criteo's (~1M): its tables "
           "(16 floats per id, x3 with Adam's moments) add ~0.2 GiB per model there.", "",
           f"## Full Criteo ({f['rows']:,} rows, x{f['scale']}), extrapolated linearly", "",
           "| stage | hours per epoch | fewest epochs (patience + 1) | hours |", "|---|---|---|---|"]  # fmt: skip
    for k, h in f["per_epoch_h"].items():
        md.append(f"| {k} | {h:.2f} | {f['fewest_epochs'].get(k, 1)} | {f['at_fewest_epochs_h'][k]:.2f} |")
    md += ["", f"Total at the fewest epochs: **{f['total_h']:.2f} h** ({ok_t} the {f['target_h']:.0f} h target). "
           "More epochs add their per-epoch hours each.", ""]  # fmt: skip
    return "\n".join(md)


if __name__ == "__main__":
    raise SystemExit(main())
