"""The gate sweep behind a real dataset's defaults (``make tune``), chosen on VALIDATION AUC only.

1. **Optuna sweep** (``experiment=tune_gate``: the Hydra Optuna sweeper, TPE, 40 trials on seed 100)
   over the gate's lr, init_bias, lambda_reg, input_norm and ``search.model_lr_scale``; each trial is
   ``stage=all`` and its objective the routed iHAS validation AUC.
2. **Confirmation**: validation AUC of one seed on a few hundred rows is noisy (+-0.02), so the
   ``--top`` best trials are re-run on seeds 100-102 and the defaults are the best MEAN validation
   AUC among those whose search closes something (open share <= 0.9).

Writes ``experiments/results/tune_gate_<setting>.{json,md}`` (every trial and the confirmation
table); the chosen values go to ``conf/dataset/<dataset>.yaml`` by hand, with a pointer to the file.
Test metrics are recorded for the record only and never used to choose. ::

    python -m experiments.bench.tune --dataset criteo            # sweep + confirmation
    python -m experiments.bench.tune --dataset avazu --sweep-dir <existing sweep dir>
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from ihas_lightning.utils import write_json

from .runs import fmt, mean_ci, run_stage_all, sample_overrides, summarize_run

TUNED = ["method.gate.lr", "method.gate.lambda_reg", "method.gate.init_bias", "method.gate.input_norm",
         "search.model_lr_scale"]  # fmt: skip
CONFIRM_SEEDS = [100, 101, 102]
MAX_OPEN_SHARE = 0.9


def run_sweep(data: list[str], sweep_dir: Path, trials: int, log: Path) -> None:
    cmd = [sys.executable, "-m", "ihas_lightning", "experiment=tune_gate", *data,
           f"hydra.sweep.dir={sweep_dir}", f"hydra.sweeper.n_trials={trials}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"tune: the Optuna sweep failed (log: {log})")


def read_trials(sweep_dir: Path) -> list[dict[str, Any]]:
    trials = []
    for job in sorted(sweep_dir.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1):
        if not (job / "evaluate" / "results.json").is_file():
            continue
        ov = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        params = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in ov if o.split("=", 1)[0] in TUNED}
        r = summarize_run(job)
        trials.append({"trial": int(job.name), "params": params, "val_auc": r["rows"]["iHAS"]["val_auc"],
                       "test_auc": r["rows"]["iHAS"]["test_auc"], "open_share": r["search"]["open_share"]})  # fmt: skip
    return trials


def _round_param(k: str, v: str) -> str:
    try:
        f = float(v)
    except ValueError:
        return v
    return f"{f:.2g}" if k in ("method.gate.lr", "method.gate.lambda_reg") else v


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", required=True, choices=["criteo", "avazu"])
    ap.add_argument("--split", default="given", choices=["given", "random"])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument(
        "--sweep-dir", default=None, help="an existing experiment=tune_gate sweep dir (skip step 1)"
    )
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--runs-dir", default=None)
    args = ap.parse_args(argv)
    name = f"{args.dataset}-{args.split}"
    with tempfile.TemporaryDirectory(prefix="ihas-tune-") as tmp:
        root = Path(args.runs_dir) if args.runs_dir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        data = sample_overrides(args.dataset, args.split, root / "prepared")
        sweep_dir = Path(args.sweep_dir) if args.sweep_dir else root / "sweep"
        if not args.sweep_dir:
            run_sweep(data, sweep_dir, args.trials, root / "sweep.log")
        trials = read_trials(sweep_dir)
        if not trials:
            raise SystemExit(f"tune: no finished trial in {sweep_dir}")
        ranked = sorted(trials, key=lambda t: -t["val_auc"])
        candidates = [t for t in ranked if t["open_share"] <= MAX_OPEN_SHARE][: args.top]
        confirmed = []
        for t in candidates:
            params = [f"{k}={_round_param(k, v)}" for k, v in t["params"].items()]
            runs = []
            for s in CONFIRM_SEEDS:
                rd = root / "confirm" / f"trial{t['trial']}-seed{s}"
                run_stage_all([*data, *params, f"seed={s}", "stage.train_base=false"], rd,
                              root / "logs" / f"{rd.name}.log")  # fmt: skip
                runs.append(summarize_run(rd))
            entry = {
                "trial": t["trial"],
                "overrides": params,
                "val_auc": mean_ci([r["rows"]["iHAS"]["val_auc"] for r in runs]),
                "val_logloss": mean_ci([r["rows"]["iHAS"]["val_logloss"] for r in runs]),
                "open_share": mean_ci([r["search"]["open_share"] for r in runs]),
                "test_auc_not_used": mean_ci([r["rows"]["iHAS"]["test_auc"] for r in runs]),
            }
            confirmed.append(entry)
            print(
                f"trial {t['trial']} {' '.join(params)}: mean val AUC {entry['val_auc']['mean']:.4f}",
                flush=True,
            )
    eligible = [c for c in confirmed if c["open_share"]["mean"] <= MAX_OPEN_SHARE] or confirmed
    best = max(eligible, key=lambda c: c["val_auc"]["mean"])
    result = {"setting": name, "date": time.strftime("%Y-%m-%d"), "trials": trials, "confirm_seeds": CONFIRM_SEEDS,
              "confirmed": confirmed, "chosen": best}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"tune_gate_{name}.json", result)
    (out / f"tune_gate_{name}.md").write_text(markdown(result))
    print(f"chosen for {name}: {' '.join(best['overrides'])} (mean val AUC {best['val_auc']['mean']:.4f})")
    return result


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Gate sweep: {r['setting']} ({r['date']})",
        "",
        "`python -m experiments.bench.tune` (see its docstring). Objective: the routed iHAS VALIDATION "
        "AUC of `stage=all`; test AUC is shown for the record and was not used.",
        "",
        f"## Confirmation of the best trials on seeds {', '.join(map(str, r['confirm_seeds']))}",
        "",
        "| trial | overrides | mean val AUC | mean val logloss | open share | (test AUC, not used) |",
        "|---|---|---|---|---|---|",
    ]
    for c in sorted(r["confirmed"], key=lambda c: -c["val_auc"]["mean"]):
        mark = " **chosen**" if c is r["chosen"] or c == r["chosen"] else ""
        lines.append(
            f"| {c['trial']}{mark} | `{' '.join(c['overrides'])}` | {fmt(c['val_auc']['mean'])} "
            f"| {fmt(c['val_logloss']['mean'])} | {fmt(c['open_share']['mean'], 3)} | {fmt(c['test_auc_not_used']['mean'])} |"
        )
    lines += [
        "",
        "## Every Optuna trial (seed 100)",
        "",
        "| trial | val AUC | open share | params |",
        "|---|---|---|---|",
    ]
    for t in sorted(r["trials"], key=lambda t: -t["val_auc"]):
        ps = " ".join(f"{k.split('.')[-1]}={_round_param(k, v)}" for k, v in t["params"].items())
        lines.append(f"| {t['trial']} | {fmt(t['val_auc'])} | {fmt(t['open_share'], 3)} | {ps} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
