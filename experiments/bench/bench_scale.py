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

Every fit early-stops as in a real run (capped at ``--max-epochs``; ``--one-epoch``: one epoch per
fit, the older bench), and the epochs each took (``epochs_run`` of its metrics.json; retrain: the
clusters' epochs weighted by their rows) are reported. Extrapolation to 45.8M rows is linear in rows
per epoch (every stage streams; none holds the raw data or all masked embeddings) at the epochs
taken here, beside the fewest that early stopping allows (``patience + 1``). The search stage's time
is split between its pretraining and search epochs by the pretraining's own wall time
(``search/pretraining.json``). Where ``stage=all`` took Base from the search's pretraining (its fit, to
the last bit), the base stage is a scoring pass and Table 2's Base row costs the pretraining. It also estimates Table 2 on full
Criteo (8 methods x 3 seeds) from the per-method figures (:func:`table2_estimate`). The machine and
its load are printed and recorded. Writes ``experiments/results/bench_scale.{json,md}``.
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


def machine() -> dict[str, Any]:
    """The machine and its load (printed by the benchmark and recorded)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    return {
        "cpu": model or platform.machine(),
        "cores": cores,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def base_derived(run: Path) -> bool:
    """Base was taken from the search's pretraining (stage=all fitted it once), not fitted on its own."""
    f = run / "base" / "search" / "metrics.json"
    return f.is_file() and bool(json.loads(f.read_text()).get("derived_from"))


def split_search(run: Path, seconds: float, taken: dict[str, float]) -> tuple[float, float]:
    """The search stage's seconds as (pretraining, search phase): the pretraining's own wall time
    (``search/pretraining.json``) where recorded, else split by the epochs' count (a search epoch costs
    more: an upper bound for the pretraining, a lower bound for the search)."""
    f = run / "search" / "pretraining.json"
    pre = json.loads(f.read_text()).get("fit_seconds") if f.is_file() else None
    if pre is None or not 0 < pre < seconds:
        n = max(1.0, taken.get("pretrain", 1) + taken.get("search", 1))
        pre = seconds * taken.get("pretrain", 1) / n
    return float(pre), float(seconds - pre)


def epochs_taken(run: Path, train_rows: int) -> dict[str, float]:
    """Epochs each early-stopped fit of the run took (``epochs_run`` of its metrics.json): base, the
    search's pretraining and search epochs, and retrain (the clusters' epochs weighted by their train rows)."""
    from ihas_lightning.utils import read_json

    out: dict[str, float] = {}
    for stage in ("base", "search"):
        f = run / stage / "metrics.json"
        if not f.is_file():
            f = run / stage / "search" / "metrics.json"  # stage=all runs Base's fit in base/search/
        if f.is_file():
            m = read_json(f)
            if stage == "base":
                out["base"] = int(m["epochs_run"])
            else:
                pre = int(m.get("pretrain_epochs") or 0)
                out["pretrain"], out["search"] = pre, int(m["epochs_run"]) - pre
    sizes = (
        read_json(run / "cluster" / "cluster.json")["sizes"]["train"] if (run / "cluster").is_dir() else []
    )
    eps = []
    for c, n in enumerate(sizes):
        f = run / "retrain" / f"cluster_{c}" / "metrics.json"
        if f.is_file():
            eps.append((int(read_json(f)["epochs_run"]), n))
    if eps:
        out["retrain"] = round(sum(e * n for e, n in eps) / max(1, sum(n for _, n in eps)), 2)
    return out


TABLE2 = ("base", "ihas", "pep", "autofield", "optembed", "adafs_soft", "adafs_hard", "optfs")


def table2_estimate(res: dict[str, Any], bench_train: Path, table2_md: Path) -> dict[str, Any]:
    """Hours of Table 2 on full Criteo (8 methods x 3 seeds) from the per-method figures.

    Base and iHAS: this run's extrapolated stages at the epochs taken. Every other method: its
    search-phase fit at Base's epochs, its training cost per sample relative to Base's from
    ``bench_train.json`` (``lightning_<method>`` / ``lightning_base`` samples/s), or where that has no
    figure, from the wall seconds of ``table2_criteo.md`` relative to Base's (the shared sample: a
    rough ratio); plus retrain (at iHAS's retrain hours) where its phases have one, plus evaluate.
    Prepare runs once."""
    from ihas_lightning.config import compose

    full = dict(res["full_criteo"]["at_epochs_taken_h"])
    if res.get("base_derived"):  # a Base job fits: the pretraining is that fit
        full["base"] = full["pretrain"]
    sps: dict[str, float] = {}
    if bench_train.is_file():
        thr = json.loads(bench_train.read_text()).get("throughput", {})
        sps = {
            k.removeprefix("lightning_"): v["samples_per_s"]
            for k, v in thr.items()
            if k.startswith("lightning_")
        }
    wall: dict[str, float] = {}
    if table2_md.is_file():
        names = {"Base": "base", "iHAS": "ihas", "PEP": "pep", "AutoField": "autofield", "OptEmbed": "optembed",
                 "AdaFS-soft": "adafs_soft", "AdaFS-hard": "adafs_hard", "OptFS": "optfs"}  # fmt: skip
        for line in table2_md.read_text().splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells and cells[0] in names:
                try:
                    wall[names[cells[0]]] = float(cells[-1])
                except ValueError:
                    pass
    rows: dict[str, Any] = {}
    for m in TABLE2:
        if m == "base":
            fit = "the search's pretraining (= Base's fit)" if res.get("base_derived") else "base"
            h, how = full["base"] + full["evaluate"], f"this run: {fit} + evaluate"
        elif m == "ihas":
            h = sum(full[k] for k in ("pretrain", "search", "cluster", "retrain", "evaluate"))
            how = "this run: search + cluster + retrain + evaluate"
        else:
            phases = list(compose([f"method={m}"]).method.phases)
            if m in sps and "base" in sps:
                ratio, src = (
                    sps["base"] / sps[m],
                    f"bench_train {sps[m]:,.0f} vs Base {sps['base']:,.0f} samples/s",
                )
            elif m in wall and wall.get("base"):
                ratio, src = (
                    wall[m] / wall["base"],
                    f"table2_criteo wall {wall[m]:g} s vs Base {wall['base']:g} s",
                )
            else:
                ratio, src = 1.0, "no figure: Base's cost"
            h = full["base"] * ratio + (full["retrain"] if "retrain" in phases else 0.0) + full["evaluate"]
            how = (
                f"Base's fit x {ratio:.2f} ({src})"
                + (" + retrain" if "retrain" in phases else "")
                + " + evaluate"
            )
        rows[m] = {"hours_per_seed": round(h, 3), "how": how}
    total = full["prepare"] + 3 * sum(r["hours_per_seed"] for r in rows.values())
    return {
        "methods": rows,
        "seeds": 3,
        "total_h": round(total, 2),
        "cpu_cores": res["machine"]["cores"],
        "gpu": None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5_000_000, help="generated Criteo rows (default 5M)")
    ap.add_argument("--out", default="experiments/results/bench_scale")
    ap.add_argument("--work", default=None, help="work dir (default: a temp dir, removed at the end)")
    ap.add_argument("--one-epoch", action="store_true", help="one epoch per fit (the older, shorter bench)")
    ap.add_argument("--max-epochs", type=int, default=8, help="cap of every early-stopped fit (default 8)")
    ap.add_argument("--extra", nargs="*", default=[], help="more overrides for stage=all")
    ap.add_argument("--search-cost", default=None, metavar="JSON",
                    help="an itemised search step (the measuring script's JSON) to add to the report")  # fmt: skip
    ap.add_argument("--resummarise", default=None, metavar="JSON",
                    help="no new run: summarise the finished run in --work again, with the wall time, peaks "
                         "and machine of that run's earlier JSON")  # fmt: skip
    args = ap.parse_args(argv)
    if args.resummarise and not args.work:
        raise SystemExit("--resummarise needs the run's --work dir")
    prev = json.loads(Path(args.resummarise).read_text()) if args.resummarise else None

    from omegaconf import OmegaConf

    from ihas_lightning.config import compose
    from ihas_lightning.data.rawgen import generate
    from ihas_lightning.utils import read_json

    start = prev["machine"] if prev else machine()
    print(
        f"machine: {start['cpu']}, {start['cores']} cores; load average {start['load_average']}", flush=True
    )
    with tempfile.TemporaryDirectory() as td:
        work = Path(args.work) if args.work else Path(td)
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        if prev:
            raw, gen_s = work / "criteo_gen.txt", prev["generate_s"]
        else:
            raw = generate("criteo", args.rows, work / "criteo_gen.txt")
            gen_s = time.perf_counter() - t
        raw_bytes = raw.stat().st_size
        print(f"generated {args.rows:,} rows ({raw_bytes / 2**20:,.0f} MiB) in {gen_s:.0f} s", flush=True)
        run = work / "run"
        cap = 1 if args.one_epoch else int(args.max_epochs)
        bench_epochs = {
            "search.pretrain.max_epochs": cap,
            "search.max_epochs": cap,
            "retrain.max_epochs": cap,
        }
        overrides = [
            "dataset=criteo", f"dataset.raw_path={raw}", "+dataset.loader_mode=streaming", "logger=none",
            f"paths.data_dir={work / 'data'}", f"paths.output_dir={run}", "trainer.enable_progress_bar=false",
            "prepare.progress=false", *[f"{k}={v}" for k, v in bench_epochs.items()], *args.extra,
        ]  # fmt: skip
        if prev:
            peaks = {k: int(v["peak_rss_mib"] * 1024) for k, v in prev["stages"].items()}
            peak_all, wall = int(prev["peak_rss_mib"] * 1024), prev["wall_s"]
        else:
            peaks, peak_all, wall = run_pipeline(overrides, work / "stage_all.log")
        seconds = {k: v["seconds"] for k, v in read_json(run / "pipeline.json")["stages"].items()}
        missing = [k for k in STAGES if k not in seconds]
        if missing:  # e.g. a SIGTERM from outside: Lightning stops the fit and the pipeline ends early
            raise SystemExit(f"stage=all ended without {missing}; see {work / 'stage_all.log'}")
        fmap = read_json(work / "data" / "criteo" / "feature_map.json")
        cfg = compose(["stage=all", "dataset=criteo"], output_dir=work / "defaults")
        train_rows = int(fmap["splits"]["train"]["rows"])
        taken = epochs_taken(run, train_rows)
        cinfo = read_json(run / "cluster" / "cluster.json")
        cluster = {"sizes": cinfo["sizes"], "field_dims": [int(sum(d)) for d in cinfo["field_dims"]],
                   "seconds_by_part": cinfo.get("seconds_by_part"),
                   "router_agreement": (cinfo.get("router") or {}).get("agreement")}  # fmt: skip
        ev = run / "evaluate" / "results.json"
        ihas_auc = None
        if ev.is_file():
            rows = read_json(ev)["rows"]
            ihas_auc = {r["model"]: r.get("test_auc") for r in rows}
    end = prev["machine_at_end"] if prev else machine()

    # ---- the full-data estimate ------------------------------------------------------------------
    scale = FULL_CRITEO_ROWS / args.rows
    pre = OmegaConf.select(cfg, "search.pretrain")
    fewest = {  # epochs an early-stopped fit runs at the least (patience + 1), per fit
        "base": int(cfg.search.patience) + 1,
        "pretrain": int(pre.patience) + 1 if pre.patience is not None else int(pre.max_epochs),
        "search": int(cfg.search.patience) + 1,
        "retrain": int(cfg.retrain.patience) + 1,
    }
    run_epochs = {k: float(taken.get(k, 1)) for k in fewest}  # epochs this run's fits took
    derived = base_derived(run)
    if derived:  # Base taken from the search's pretraining: one scoring pass, no fit of its own
        fewest["base"] = run_epochs["base"] = 1.0
    pre_s, search_s = split_search(run, seconds["search"], taken)
    per_epoch = {
        "prepare": seconds["prepare"] * scale,
        "base": seconds["base"] / max(1.0, run_epochs["base"]) * scale,
        "pretrain": pre_s / max(1.0, taken.get("pretrain", 1)) * scale,
        "search": search_s / max(1.0, taken.get("search", 1)) * scale,
        "cluster": seconds["cluster"] * scale,
        "retrain": seconds["retrain"] / max(1.0, run_epochs["retrain"]) * scale,
        "evaluate": seconds["evaluate"] * scale,
    }
    at_fewest = {k: v * fewest.get(k, 1) for k, v in per_epoch.items()}
    at_taken = {k: v * run_epochs.get(k, 1) for k, v in per_epoch.items()}
    res: dict[str, Any] = {
        "machine": start, "machine_at_end": end,
        "rows": args.rows, "raw_mib": round(raw_bytes / 2**20, 1), "generate_s": round(gen_s, 1),
        "train_rows": train_rows, "ids": int(sum(f["vocab_size"] for f in fmap["fields"])),
        "fields": len(fmap["fields"]), "overrides": _portable_overrides(overrides[3:]), "wall_s": round(wall, 1),
        "epoch_cap": cap,
        "stages": {
            k: {"seconds": seconds.get(k), "peak_rss_mib": round(peaks[k] / 1024, 1),
                "rows_per_s": round((args.rows if k == "prepare" else train_rows) / seconds[k]),
                **({"epochs": run_epochs[k]} if k in run_epochs else {}),
                **({"rows_per_s_per_epoch": round(train_rows * run_epochs[k] / seconds[k])}
                   if k == "retrain" or (k == "base" and not derived) else {})}
            for k in STAGES if k in seconds
        },
        "base_derived": derived,
        "search_split_s": {"pretrain": round(pre_s, 1), "search": round(search_s, 1)},
        "epochs_taken": taken,
        "cluster": cluster, "test_auc": ihas_auc,
        "peak_rss_mib": round(peak_all / 1024, 1),
        "full_criteo": {
            "rows": FULL_CRITEO_ROWS, "scale": round(scale, 3), "fewest_epochs": fewest, "epochs_taken": run_epochs,
            "per_epoch_h": {k: round(v / 3600, 3) for k, v in per_epoch.items()},
            "at_fewest_epochs_h": {k: round(v / 3600, 3) for k, v in at_fewest.items()},
            "at_epochs_taken_h": {k: round(v / 3600, 3) for k, v in at_taken.items()},
            "total_fewest_h": round(sum(at_fewest.values()) / 3600, 2),
            "total_h": round(sum(at_taken.values()) / 3600, 2),
            "target_h": 1.0,
        },
        "peak_rss_target_mib": 8 * 1024,
    }  # fmt: skip
    res["table2_full_criteo"] = table2_estimate(
        res, Path("experiments/results/bench_train.json"), Path("experiments/results/table2_criteo.md")
    )
    if args.search_cost:
        res["search_step_cost"] = json.loads(Path(args.search_cost).read_text())
    save_results(args.out, res, markdown(res))
    return 0


def rewrite_markdown(json_path: str = "experiments/results/bench_scale.json") -> None:
    """Re-render the .md beside a bench_scale JSON (after a change of the report's text)."""
    res = json.loads(Path(json_path).read_text())
    Path(json_path).with_suffix(".md").write_text(markdown(res))


def _portable_overrides(overrides: list[str]) -> list[str]:
    """The overrides as a committed file names them (no machine path: ``.../<last component>``)."""
    from ihas_lightning.report.build import portable_path

    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        out.append(f"{key}={portable_path(value)}" if eq else o)
    return out


def _load_note(m: dict[str, Any]) -> str:
    """How to read the run's figures given the load before it started."""
    if m["load_average"][0] < 0.5:
        return "a quiet machine when it started; the load at the end is the run's own, on every core"
    return "other processes shared the cores: the figures are a busy machine's"


def markdown(r: dict[str, Any]) -> str:
    f = r["full_criteo"]
    m, me = r["machine"], r.get("machine_at_end", r["machine"])
    fits = (
        "one epoch per fit"
        if r.get("epoch_cap") == 1
        else f"every fit early-stopped (capped at {r.get('epoch_cap')} epochs)"
    )
    md = [f"# The pipeline at scale ({m['cpu']}, {m['cores']} cores, CPU)", "",
          f"Load average at the start {m['load_average']}, at the end {me['load_average']} ({_load_note(m)}).", "",
          f"`stage=all` on {r['rows']:,} generated Criteo rows ({r['raw_mib']:,} MiB raw; {r['train_rows']:,} train "
          f"rows, {r['ids']:,} ids after min_count 10), {fits}, data streamed from Parquet: "
          f"{r['wall_s']:,} s wall. Generating the rows took {r['generate_s']} s (not in the pipeline).", "",
          "| stage | seconds | epochs | train rows/s (prepare: raw rows/s) | train rows/s per epoch | peak RSS MiB |",
          "|---|---|---|---|---|---|"]  # fmt: skip
    for k, s in r["stages"].items():
        ep = s.get("epochs", "")
        md.append(f"| {k} | {s['seconds']:.1f} | {ep} | {s['rows_per_s']:,} | {s.get('rows_per_s_per_epoch', s['rows_per_s']):,} "
                  f"| {s['peak_rss_mib']:,.0f} |")  # fmt: skip
    if r.get("base_derived"):
        sp = r.get("search_split_s") or {}
        md += ["", "Base was fitted once: `stage=all` takes it from the search's pretraining (the same weights to "
               "the last bit), so the base row is its scoring only; the search's "
               f"{r['stages']['search']['seconds']:.1f} s are {sp.get('pretrain')} s of pretraining (= Base's fit, "
               f"{r['epochs_taken'].get('pretrain')} epochs) and {sp.get('search')} s of search."]  # fmt: skip
    c = r.get("cluster") or {}
    if c:
        md += ["", f"Cluster stage: sizes (train) {c['sizes']['train']}, kept dims per cluster {c['field_dims']}, router "
               f"agreement {c.get('router_agreement')}; its seconds by part {c.get('seconds_by_part')}."]  # fmt: skip
    if r.get("test_auc"):
        md += [
            "",
            "Test AUC: " + ", ".join(f"{k} {v:.4f}" for k, v in r["test_auc"].items() if v is not None) + ".",
        ]
    ok_rss = "meets" if r["peak_rss_mib"] <= r["peak_rss_target_mib"] else "misses"
    ok_t = "meets" if f["total_h"] <= f["target_h"] else "misses"
    eval_rows = r["rows"] - r["train_rows"]
    eval_full_gib = eval_rows * f["scale"] * r["fields"] * 4 / 2**30
    md += ["", f"Peak RSS of the whole run: {r['peak_rss_mib']:,.0f} MiB ({ok_rss} the 8 GiB target at this size). "
           "Prepare, the fits and the cluster stage stream the data (the cluster stage keeps each train row's gate "
           "mask as bits, 78 bytes a row: 2.9 GB on full Criteo's 36.7M train rows); evaluate holds the val and test ids in memory (int32): "
           f"{eval_rows * r['fields'] * 4 / 2**20:,.0f} MiB here, {eval_full_gib:.1f} GiB on full Criteo, so its peak "
           f"there is about {r['stages']['evaluate']['peak_rss_mib'] / 1024 + eval_full_gib:.1f} GiB.", "",
           f"## Full Criteo ({f['rows']:,} rows, x{f['scale']}), extrapolated linearly", "",
           "The epochs each fit took here are taken for full Criteo too (more data per epoch usually needs no more "
           "epochs); the fewest that early stopping allows (patience + 1) are shown beside them. A fit that reached "
           "the cap was still improving: more epochs would add their hours per epoch each.", "",
           "| stage | hours per epoch | epochs taken | hours | fewest epochs | hours at the fewest |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    fit_stages = ("base", "pretrain", "search", "retrain")
    for k, h in f["per_epoch_h"].items():
        cap = " (the cap)" if k in fit_stages and f["epochs_taken"].get(k) == r.get("epoch_cap") else ""
        md.append(f"| {k} | {h:.3f} | {f['epochs_taken'].get(k, 1):g}{cap} | {f['at_epochs_taken_h'][k]:.2f} | "
                  f"{f['fewest_epochs'].get(k, 1)} | {f['at_fewest_epochs_h'][k]:.2f} |")  # fmt: skip
    md += ["", f"Base + the iHAS pipeline at the epochs taken: **{f['total_h']:.2f} h** ({ok_t} the {f['target_h']:.0f} h "
           f"target on {m['cores']} cores); at the fewest epochs {f['total_fewest_h']:.2f} h.", ""]  # fmt: skip
    sc = r.get("search_step_cost")
    if sc:
        md += ["## The search's per-batch cost, itemised", "",
               f"{sc['note']} Batch {sc['batch']}, {sc['threads']} torch thread, load average {sc['load']}: "
               "noisy (a busy machine); the shares, not the exact figures, are the point.", "",
               "| part | ms per batch | rows/s |", "|---|---|---|"]  # fmt: skip
        for k, v in sc["ms"].items():
            md.append(f"| {k} | {v:.2f} | {sc['batch'] / v * 1000:,.0f} |")
        md += ["", f"With a gate step every {sc['search_every']} batches: {sc['per_batch_ms']:.1f} ms per training "
               f"batch, {sc['batch'] / sc['per_batch_ms'] * 1000:,.0f} samples/s without the loader and Lightning.", ""]  # fmt: skip
    t2 = r.get("table2_full_criteo")
    if t2:
        md += ["## Table 2 on full Criteo (8 methods x 3 seeds), estimated", "",
               "| method | hours per seed | from |", "|---|---|---|"]  # fmt: skip
        for name, x in t2["methods"].items():
            md.append(f"| {name} | {x['hours_per_seed']:.2f} | {x['how']} |")
        md += ["", f"Total (prepare once, 3 seeds each): **{t2['total_h']:.1f} h** on {t2['cpu_cores']} cores. On one GPU: "
               "not measured yet (no device was lent; `make bench-gpu` waits for one).", ""]  # fmt: skip
    return "\n".join(md)


if __name__ == "__main__":
    raise SystemExit(main())
