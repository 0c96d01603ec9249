"""Every method side by side through ``stage=all`` (the path users run): ``make baselines``.

For each dataset setting (the planted synthetic data; the shared Criteo sample with its given split)
and each seed, runs ``python -m ihas_lightning stage=all method=<m>`` for Base, iHAS, AdaFS-soft,
AdaFS-hard, AutoField and OptFS with their config defaults (the baselines with ``stage.train_base=false``:
their Base is the ``method=base`` run of the same seed), and reports per method:

* test AUC / logloss of its final model (mean with a 95% t-interval over seeds) and the paired
  difference to Base of the same seed (win / lose when the interval excludes 0, else tie);
* parameters of the model used at inference, embedding and dense parts separately, and inference time
  over the whole test split (same batch size, warm-up, loading excluded; AdaFS includes its controller,
  iHAS its routing);
* on synthetic data, what AutoField and OptFS keep against ``truth.json``, per seed.

Writes ``experiments/results/baselines.{json,md}``. This is the issue-9 acceptance run, not the paper's
Table 2 (that command, with PEP and OptEmbed, is ``experiment=table2``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from .runs import fmt, fmt_ci, mean_ci, run_stage_all, sample_overrides, verdict

METHODS = ["base", "ihas", "adafs_soft", "adafs_hard", "autofield", "optfs"]
RESULTS = Path(
    os.environ.get("IHAS_RESULTS_DIR", Path(__file__).resolve().parents[2] / "experiments" / "results")
)


def settings(root: Path, names: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in names:
        if n == "synthetic":
            out[n] = ["dataset=synthetic", f"paths.data_dir={root / 'data'}"]
        else:
            ds, split = n.split("-")
            out[n] = sample_overrides(ds, split, root / "prepared")
    return out


def one_run(run_dir: Path) -> dict[str, Any]:
    res = json.loads((run_dir / "evaluate" / "results.json").read_text())
    final = next(r for r in res["rows"] if r["model"] == res["final_row"])
    pipe = json.loads((run_dir / "pipeline.json").read_text())
    out = {
        "final_row": res["final_row"],
        **{k: final.get(k) for k in ("val_auc", "val_logloss", "test_auc", "test_logloss", "params",
                                      "embedding_params", "dense_params", "index_entries", "inference_ms")},
        "pipeline_seconds": pipe.get("total_seconds"),
        "warnings": res.get("warnings", []),
    }  # fmt: skip
    if "derived_vs_truth" in res:
        out["derived_vs_truth"] = res["derived_vs_truth"]
    arch = run_dir / "derive" / "arch.json"
    if arch.is_file():
        a = json.loads(arch.read_text())
        out["kept_fields"] = a["kept_fields"]
        out["kept_rows_share"] = a.get("kept_rows_share")
    return out


def summarize(runs: dict[str, dict[str, dict[int, dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for setting, per_method in runs.items():
        base = per_method.get("base", {})
        s: dict[str, Any] = {}
        for m, seeds in per_method.items():
            rec: dict[str, Any] = {"row": next(iter(seeds.values()))["final_row"]}
            for k in ("test_auc", "test_logloss", "params", "embedding_params", "dense_params",
                      "inference_ms", "pipeline_seconds"):  # fmt: skip
                rec[k] = mean_ci([r[k] for r in seeds.values() if r.get(k) is not None])
            if m != "base" and base:
                common = sorted(set(seeds) & set(base))
                for k, better in (("test_auc", True), ("test_logloss", False)):
                    d = mean_ci([seeds[sd][k] - base[sd][k] for sd in common])
                    rec[f"{k}_minus_base"] = {**d, "verdict": verdict(d, better)}
            s[m] = rec
        out[setting] = s
    return out


def to_markdown(res: dict[str, Any]) -> str:
    lines = ["# Every method through stage=all (config defaults)", "",
             f"Seeds {res['seeds']}; mean [95% t-interval]; the difference to Base is paired by seed "
             "(win/lose when its interval excludes 0). Params: the model used at inference (embedding values "
             "+ dense); inference: whole test split, ms. Machine: " + res["machine"] + ".", ""]  # fmt: skip
    for setting, per in res["summary"].items():
        lines += [f"## {setting}", "",
                  "| method | row | test AUC | AUC - Base | test logloss | logloss - Base | embedding params | "
                  "dense params | inference ms | wall s |", "|---|---|---|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
        for m, r in per.items():
            da = r.get("test_auc_minus_base")
            dl = r.get("test_logloss_minus_base")
            lines.append(
                f"| {m} | {r['row']} | {fmt_ci(r['test_auc'])} | "
                f"{fmt_ci(da, signed=True) + ' ' + da['verdict'] if da else '-'} | {fmt_ci(r['test_logloss'])} | "
                f"{fmt_ci(dl, signed=True) + ' ' + dl['verdict'] if dl else '-'} | "
                f"{fmt(r['embedding_params']['mean'], 0)} | {fmt(r['dense_params']['mean'], 0)} | "
                f"{fmt(r['inference_ms']['mean'], 2)} | {fmt(r['pipeline_seconds']['mean'], 0)} |"
            )
        lines.append("")
        for m in ("autofield", "optfs"):
            seeds = res["runs"].get(setting, {}).get(m, {})
            if not seeds:
                continue
            lines += [f"{m} per seed:", ""]
            for sd, r in sorted(seeds.items()):
                t = r.get("derived_vs_truth")
                kept = ", ".join(r.get("kept_fields") or [])
                line = f"* seed {sd}: kept fields {kept}"
                if r.get("kept_rows_share") is not None:
                    line += f"; kept feature values {r['kept_rows_share']:.3f}"
                if t:
                    line += f"; vs truth: precision {t['precision']:.3f}, recall {t['recall']:.3f}, F1 {t['f1']:.3f}"
                    if t.get("kept_value_share_relevant") is not None:
                        line += (f"; kept values on relevant fields {t['kept_value_share_relevant']:.3f}, "
                                 f"on noise fields {t['kept_value_share_noise']:.3f}")  # fmt: skip
                lines.append(line)
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=["synthetic", "criteo-given"])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--runs-dir", default=None)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    import tempfile

    root = Path(args.runs_dir or tempfile.mkdtemp(prefix="ihas-baselines-"))
    runs: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    t0 = time.perf_counter()
    for setting, base_ov in settings(root, args.settings).items():
        for m in args.methods:
            for seed in args.seeds:
                rd = root / setting / f"{m}-s{seed}"
                ov = [*base_ov, f"method={m}", f"seed={seed}"]
                if m != "base":
                    ov.append("stage.train_base=false")
                secs = run_stage_all(ov, rd, root / "logs" / f"{setting}-{m}-s{seed}.log")
                r = one_run(rd)
                runs.setdefault(setting, {}).setdefault(m, {})[seed] = r
                print(f"{setting} {m} seed {seed}: {r['final_row']} test AUC {fmt(r['test_auc'])} "
                      f"logloss {fmt(r['test_logloss'])} ({secs:.0f} s)", flush=True)  # fmt: skip
    res = {
        "seeds": args.seeds,
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "runs_dir": str(root),
        "seconds": round(time.perf_counter() - t0, 1),
        "runs": runs,
        "summary": summarize(runs),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from ihas_lightning.utils import write_json

    write_json(out / "baselines.json", res)
    (out / "baselines.md").write_text(to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
