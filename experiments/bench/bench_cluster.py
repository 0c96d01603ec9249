"""The cluster stage side by side: two code bases on the same finished run, one after the other.

``make bench-scale`` leaves its run in ``--work``; this runs ``stage=cluster`` on that run's search
checkpoints (``best.ckpt``, and ``last.ckpt``: the last search epoch's gate, which is sample-dependent
where best is the gates-open fallback) with each ``--code NAME=DIR`` (a checkout of this repo, e.g. a
``git worktree`` of an older commit), in its own process, the command a user runs::

    python -m ihas_lightning stage=cluster dataset=criteo dataset.raw_path=<rows> \\
        +dataset.loader_mode=streaming paths.data_dir=<work>/data search.ckpt=<ckpt> ...

and records, per (checkpoint, code): the stage's seconds and its parts, train rows/s, the cluster sizes,
the kept dims per cluster and the distilled router's agreement. Writes
``experiments/results/bench_cluster.{json,md}``; the machine and its load are printed and recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import save_results
from .bench_scale import machine


def run_cluster(code: Path, work: Path, ckpt: Path, out: Path) -> dict[str, Any]:
    """One ``stage=cluster`` run of the code in ``code`` into ``out``: its cluster.json, summarised."""
    overrides = [
        "stage=cluster", "dataset=criteo", f"dataset.raw_path={work / 'criteo_gen.txt'}",
        "+dataset.loader_mode=streaming", "logger=none", f"paths.data_dir={work / 'data'}",
        f"paths.output_dir={out}", "trainer.enable_progress_bar=false", f"search.ckpt={ckpt}",
        f"hydra.run.dir={out / 'hydra'}",
    ]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(code / "src"), "WANDB_MODE": "offline"}
    t = time.perf_counter()
    with open(f"{out}.log", "w") as log:
        rc = subprocess.call([sys.executable, "-m", "ihas_lightning", *overrides], cwd=code, env=env,
                             stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    wall = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"stage=cluster failed (exit {rc}); see {out}.log")
    c = json.loads((out / "cluster" / "cluster.json").read_text())
    train = sum(c["sizes"]["train"])
    return {
        "wall_s": round(wall, 1),
        "stage_s": c["seconds"],
        "train_rows_per_s": round(train / c["seconds"]),
        "seconds_by_part": c.get("seconds_by_part"),
        "sizes": c["sizes"],
        "kept_dims": [int(sum(d)) for d in c["field_dims"]],
        "router_agreement": (c.get("router") or {}).get("agreement"),
        "gate_fold": c.get("gate_fold"),
    }


def _commit(d: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(d), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(["git", "-C", str(d), "status", "--porcelain", "--untracked-files=no", "--", "src", "conf"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return f"commit {out.stdout.strip() or '?'}" + (" + uncommitted changes" if dirty else "")


def markdown(r: dict[str, Any]) -> str:
    m, names = r["machine"], list(r["code"])
    codes = ", ".join(f"{n} = {r['code'][n]}" for n in names)
    lines = [
        f"# The cluster stage side by side ({m['cpu']}, {m['cores']} cores, CPU)",
        "",
        f"Load average at the start {m['load_average']}, at the end {r['machine_at_end']['load_average']}. "
        f"`stage=cluster` on the run in `{Path(r['work']).name}` ({r['train_rows']:,} train rows), each code "
        f"base in its own process, one after the other: {codes}.",
        "",
        "| search checkpoint | code | stage s | train rows/s | parts (s) | sizes (train) | kept dims | router agreement (test) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ck, per in r["runs"].items():
        for name in names:
            x = per[name]
            parts = ", ".join(f"{k} {v:g}" for k, v in (x["seconds_by_part"] or {}).items())
            agree = (x["router_agreement"] or {}).get("test")
            lines.append(
                f"| {ck} | {name} | {x['stage_s']:.1f} | {x['train_rows_per_s']:,} | {parts} | {x['sizes']['train']} "
                f"| {x['kept_dims']} | {'-' if agree is None else f'{agree:.4f}'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="a bench-scale --work dir (its run/ and data/)")
    ap.add_argument("--code", nargs="+", required=True, metavar="NAME=DIR", help="code bases to compare")
    ap.add_argument("--ckpts", nargs="+", default=["best", "last"])
    ap.add_argument("--out", default="experiments/results/bench_cluster")
    args = ap.parse_args(argv)
    work = Path(args.work).resolve()
    code = dict(c.split("=", 1) for c in args.code)
    start = machine()
    print(
        f"machine: {start['cpu']}, {start['cores']} cores; load average {start['load_average']}", flush=True
    )
    runs: dict[str, dict[str, Any]] = {}
    for ck in args.ckpts:
        runs[ck] = {}
        for name, d in code.items():
            out = work / "side" / f"{ck}-{name}"
            runs[ck][name] = run_cluster(Path(d).resolve(), work, work / "run" / "search" / f"{ck}.ckpt", out)
            print(ck, name, runs[ck][name], flush=True)
    fmap = json.loads((work / "data" / "criteo" / "feature_map.json").read_text())
    commits = {n: _commit(Path(d)) for n, d in code.items()}  # no machine path in the results
    res = {"machine": start, "machine_at_end": machine(), "work": work.name, "code": commits, "runs": runs,
           "train_rows": int(fmap["splits"]["train"]["rows"])}  # fmt: skip
    save_results(args.out, res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
