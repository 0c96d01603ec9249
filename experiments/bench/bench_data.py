"""Data benchmark: preprocessing (``stage=prepare``) throughput and memory, then the loader.

The paper's pipeline starts from the raw Criteo log (45.8M rows, ~33M distinct raw categorical
values). The target for the preprocessing step is the full log in <= 10 min on 2 cores with a peak
RSS <= 6 GiB, i.e. >= ~76k rows/s end to end (both passes, Parquet writing included).

This script generates a Criteo-format file of ``--rows`` rows (default 5M) with
:mod:`ihas_lightning.data.rawgen` into a temporary directory, runs ``python -m ihas_lightning
stage=prepare`` on it in a subprocess (wall time; peak RSS from ``getrusage(RUSAGE_CHILDREN)``),
repeats that on a tiny file to get the fixed baseline memory, and extrapolates to the full log:

* time scales linearly with rows (both passes are streaming);
* memory above the baseline scales with the number of distinct train tokens (the counting tables
  of pass 1), which at full scale is ~33.8M/(distinct tokens measured here) times larger.

It then calls ``bench_loader`` (loader throughput on the prepared output) when that module is
present, and writes ``experiments/results/bench_data.{json,md}``::

    python -m experiments.bench.bench_data [--rows 5000000] [--format criteo] [--keep DIR]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ihas_lightning.data import rawgen
from ihas_lightning.data.feature_map import FeatureMap
from ihas_lightning.utils import write_json

REPO = Path(__file__).resolve().parents[2]
FULL_ROWS = {"criteo": rawgen.CRITEO_ROWS, "avazu": rawgen.AVAZU_ROWS}
FULL_DISTINCT = {"criteo": sum(rawgen.CRITEO_CARD), "avazu": 9_449_445}
TARGET_S = 600.0
TARGET_RSS_GIB = 6.0


def _run_prepare(raw: Path, out: Path, fmt: str, logs: Path, extra: list[str]) -> dict[str, Any]:
    """Run stage=prepare in a fresh process; wall time and that process's peak RSS."""
    cmd = [
        sys.executable, "-m", "ihas_lightning", "stage=prepare", f"dataset={fmt}", f"dataset.raw_path={raw}",
        f"dataset.prepared_dir={out}", "logger=none", "prepare.progress=false", f"paths.log_dir={logs}", *extra,
    ]  # fmt: skip
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = ru0.ru_maxrss
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    maxrss_kib = ru1.ru_maxrss
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    if r.returncode != 0:
        raise RuntimeError(f"prepare failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
    if maxrss_kib <= before:
        # RUSAGE_CHILDREN keeps the max over all children; a smaller child cannot be measured this way
        maxrss_kib = -1
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "peak_rss_mib": maxrss_kib / 1024 if maxrss_kib > 0 else None,
        "stdout": r.stdout,
    }


def _call_loader(prepared: Path) -> dict[str, Any] | None:
    try:
        from .bench_loader import bench_loader
    except ImportError as e:
        print(f"loader benchmark skipped: {e}", flush=True)
        return None
    params = inspect.signature(bench_loader).parameters
    try:
        return bench_loader(prepared_dir=prepared) if "prepared_dir" in params else bench_loader(prepared)
    except Exception as e:  # noqa: BLE001 - the preprocessing figures are still worth writing
        print(f"loader benchmark failed: {type(e).__name__}: {e}", flush=True)
        return {"error": f"{type(e).__name__}: {e}"}


def bench(
    rows: int, fmt: str = "criteo", keep: Path | None = None, loader: bool = True, seed: int = 0
) -> dict:
    tmp_ctx = tempfile.TemporaryDirectory(prefix="ihas-bench-data-")
    tmp = Path(tmp_ctx.name) if keep is None else keep
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        raw = tmp / f"{fmt}_{rows}.txt"
        t0 = time.perf_counter()
        rawgen.generate(fmt, rows, raw, seed=seed)
        gen_s = time.perf_counter() - t0
        size = raw.stat().st_size
        print(f"generated {rows:,} {fmt} rows ({size / 2**20:,.0f} MiB) in {gen_s:.1f}s", flush=True)

        # a second, 5x smaller run gives the slope of peak RSS in distinct tokens (two-point fit). It
        # runs first: RUSAGE_CHILDREN reports the max over all children, so the smaller one must come first
        small_rows = max(rows // 5, 1000)
        small_raw = tmp / f"{fmt}_{small_rows}.txt"
        rawgen.generate(fmt, small_rows, small_raw, seed=seed + 1)
        small = _run_prepare(small_raw, tmp / "prep_small", fmt, tmp / "logs", [])
        small_distinct = int(sum(FeatureMap.load(tmp / "prep_small").extra["distinct_train_tokens"].values()))
        small_raw.unlink()
        main = _run_prepare(raw, tmp / "prep", fmt, tmp / "logs", [])
        fm = FeatureMap.load(tmp / "prep")
        prepared_rows = sum(fm.rows(s) for s in ("train", "val", "test"))
        assert prepared_rows == rows, (prepared_rows, rows)
        rps = rows / main["wall_s"]
        distinct = int(sum(fm.extra.get("distinct_train_tokens", {}).values()))
        # distinct train tokens here vs all distinct raw values of the full log (an upper bound for its
        # train split): a conservative extrapolation of the vocabulary-bound memory
        full_rows, full_distinct = FULL_ROWS[fmt], FULL_DISTINCT[fmt]
        est_s = full_rows / rps
        rss, small_rss = main["peak_rss_mib"], small["peak_rss_mib"]
        est_rss = slope = None
        if rss is not None and small_rss is not None and distinct > small_distinct:
            slope = max(rss - small_rss, 0.0) / (distinct - small_distinct)  # MiB per distinct token
            est_rss = rss + slope * max(full_distinct - distinct, 0)
        cpu_rps = rows / main["cpu_s"] if main["cpu_s"] > 0 else None
        res: dict[str, Any] = {
            "format": fmt,
            "rows": rows,
            "raw_mib": round(size / 2**20, 1),
            "generate_s": round(gen_s, 2),
            "machine": {
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "python": sys.version.split()[0],
            },
            "prepare": {
                "wall_s": round(main["wall_s"], 2),
                "rows_per_s": round(rps),
                "in_process_s": fm.extra.get("seconds"),
                "cpu_s": round(main["cpu_s"], 2),
                "rows_per_cpu_s": None if cpu_rps is None else round(cpu_rps),
                "load_avg_1m_before_after": main["load_avg_1m"],
                "peak_rss_mib": None if rss is None else round(rss),
                "small_run": {
                    "rows": small_rows,
                    "peak_rss_mib": None if small_rss is None else round(small_rss),
                    "distinct_train_tokens": small_distinct,
                    "wall_s": round(small["wall_s"], 2),
                },
                "rss_bytes_per_distinct_token": None if slope is None else round(slope * 2**20, 1),
                "distinct_train_tokens": distinct,
                "kept_vocab": int(sum(fm.vocab_sizes)),
                "splits": {s: fm.rows(s) for s in ("train", "val", "test")},
                "block_size_mb": 16,
                "min_count": fm.min_count,
            },
            "extrapolated_full": {
                "rows": full_rows,
                "distinct_raw_values": full_distinct,
                "time_s": round(est_s),
                "peak_rss_gib": None if est_rss is None else round(est_rss / 1024, 2),
                "time_s_at_cpu_time": None if cpu_rps is None else round(full_rows / cpu_rps),
                "method": "time linear in rows (wall clock of this run); peak RSS linear in distinct train tokens, "
                "slope from a 5x smaller run, up to all distinct raw values of the full log",
            },
            "targets": {
                "time_s": TARGET_S,
                "peak_rss_gib": TARGET_RSS_GIB,
                "rows_per_s_needed": round(full_rows / TARGET_S),
                "time_ok": est_s <= TARGET_S,
                "rss_ok": None if est_rss is None else est_rss / 1024 <= TARGET_RSS_GIB,
            },
        }
        print(
            json.dumps({k: res[k] for k in ("prepare", "extrapolated_full", "targets")}, indent=2), flush=True
        )
        if loader:
            res["loader"] = _call_loader(tmp / "prep")
        return res
    finally:
        if keep is None:
            tmp_ctx.cleanup()


def write_report(res: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "bench_data.json", res)
    p, e, t = res["prepare"], res["extrapolated_full"], res["targets"]
    ok = lambda b: "n/a" if b is None else ("yes" if b else "NO")  # noqa: E731
    lines = [
        "# Data benchmark",
        "",
        f"Machine: {res['machine']['cpu_count']} CPUs, {res['machine']['platform']}, Python {res['machine']['python']}.",
        "",
        f"## Preprocessing (`stage=prepare`, {res['format']}, {res['rows']:,} generated rows, "
        f"{res['raw_mib']:,} MiB raw)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| wall time (subprocess, both passes, Parquet written) | {p['wall_s']} s |",
        f"| throughput | {p['rows_per_s']:,} rows/s |",
        f"| in-process pass 1 / pass 2 | {p['in_process_s']} |",
        f"| CPU time (user+sys) | {p['cpu_s']} s ({p['rows_per_cpu_s']:,} rows per CPU-second) |",
        f"| 1-min load average before / after (2 cores; other jobs share them) | {p['load_avg_1m_before_after']} |",
        f"| peak RSS | {p['peak_rss_mib']} MiB (run on {p['small_run']['rows']:,} rows: "
        f"{p['small_run']['peak_rss_mib']} MiB) |",
        f"| distinct train tokens / kept vocab (min_count {p['min_count']}) | "
        f"{p['distinct_train_tokens']:,} / {p['kept_vocab']:,} |",
        "",
        f"Extrapolated to the full log ({e['rows']:,} rows, {e['distinct_raw_values']:,} distinct raw values): "
        f"**{e['time_s']} s** (target <= {t['time_s']:.0f} s: {ok(t['time_ok'])}), "
        f"peak RSS **{e['peak_rss_gib']} GiB** (target <= {t['peak_rss_gib']} GiB: {ok(t['rss_ok'])}). "
        f"Method: {e['method']}. Wall time at this run's CPU time (no competing jobs, no overlap of the "
        f"reader thread with the main thread): ~{e['time_s_at_cpu_time']} s.",
        "",
    ]
    ld = res.get("loader")
    if ld:
        lines += ["## Loader", ""]
        if "results" in ld:
            lines += ["| setting | rows/s |", "|---|---|"]
            for k, v in ld["results"].items():
                lines.append(f"| {k} | {v.get('rows_per_s', 'n/a'):,} |")
        else:
            lines.append(f"```\n{json.dumps(ld, indent=2)}\n```")
        lines.append("")
    tmp = out_dir / ".bench_data.md.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, out_dir / "bench_data.md")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], prog="python -m experiments.bench.bench_data"
    )
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--format", choices=["criteo", "avazu"], default="criteo")
    ap.add_argument("--keep", type=Path, default=None, help="keep the generated data in this directory")
    ap.add_argument("--no-loader", action="store_true", help="skip the loader benchmark")
    ap.add_argument("--out-dir", type=Path, default=REPO / "experiments" / "results")
    a = ap.parse_args(argv)
    if a.rows < 1000:
        ap.error("--rows must be >= 1000")
    res = bench(a.rows, a.format, keep=a.keep, loader=not a.no_loader)
    write_report(res, a.out_dir)
    print(f"wrote {a.out_dir / 'bench_data.json'} and bench_data.md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
