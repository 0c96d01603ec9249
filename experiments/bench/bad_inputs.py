"""``make bad-inputs``: the CLI against bad input, as a user would type it. Each case is one command
line of ``python -m ihas_lightning`` (plus, for data cases, a small broken raw file made from the
generator); the table records the exit code, the number of stderr lines, the first of them, and how
many seconds passed before the error. Every case should end in exit 2 with one ``error:`` line (130
for Ctrl-C), before any training, and leave no complete-looking output.

``--src DIR`` runs the cases against another checkout's ``src`` (e.g. a worktree of an older commit),
so a before/after table is one command each.

Writes ``experiments/results/bad_inputs.{json,md}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ihas_lightning.data.rawgen import generate

BASE = ["stage=all", "trainer=debug", "logger=none"]
SYNTHETIC = ["dataset=synthetic", "dataset.rows=4000"]  # unless a case names its dataset

# (name, overrides, data fixture or None); the fixture's path is given as dataset.raw_path
CASES: list[tuple[str, list[str], str | None]] = [
    ("embed_dim 0", ["model.embed_dim=0"], None),
    ("negative lr", ["model.lr=-1"], None),
    ("seed not a number", ["seed=abc"], None),
    ("negative seed", ["seed=-1"], None),
    ("cluster.k 0", ["cluster.k=0"], None),
    ("cluster.k above the train rows", ["cluster.k=100000"], None),
    ("batch size 0", ["model.batch_size=0"], None),
    ("batch size not a number", ["model.batch_size=big"], None),
    ("unknown key (typo)", ["model.lrr=1"], None),
    ("unknown key added with +", ["+model.lrr=1"], None),
    ("unknown trainer argument", ["+trainer.foo=1"], None),
    ("trainer budget key", ["trainer.max_epochs=3"], None),
    ("unknown accelerator", ["trainer.accelerator=tpu"], None),
    ("GPU on a machine without one", ["trainer.accelerator=gpu"], None),
    ("bad precision", ["trainer.precision=7"], None),
    ("unknown method", ["method=nope"], None),
    ("unknown backbone", ["backbone=nope"], None),
    ("unknown dataset", ["dataset=nope"], None),
    ("unknown experiment", ["experiment=nope"], None),
    ("unknown stage", ["stage=nope"], None),
    ("override syntax", ["seed=[1"], None),
    ("hidden not a list", ["model.hidden=abc"], None),
    ("hidden with 0", ["model.hidden=[16,0]"], None),
    ("dropout 1", ["model.dropout=1.0"], None),
    ("batchnorm not a bool", ["model.batchnorm=maybe"], None),
    ("cluster batch not a number", ["cluster.batch_size=x"], None),
    ("cluster input", ["cluster.input=raw"], None),
    ("keep threshold 0", ["retrain.keep_threshold=0"], None),
    ("retrain init", ["retrain.init=random"], None),
    ("search monitor", ["search.monitor=val/f1"], None),
    ("holdout fraction 1", ["search.holdout_fraction=1.0"], None),
    ("search_every 0", ["search.search_every=0"], None),
    ("gate tau not a number", ["method.gate.tau=abc"], None),
    ("gate bins 1", ["method.gate.bins=1"], None),
    ("evaluate batch -1", ["evaluate.batch_size=-1"], None),
    ("output bias", ["model.output_bias=mean"], None),
    ("embedding optimizer", ["model.embedding_optimizer=sgd"], None),
    ("backbone_args unknown", ["backbone=dcn", "+model.backbone_args.depth=3"], None),
    ("split does not sum to 1", ["dataset.split=[0.8,0.1,0.2]"], None),
    ("on_bad_rows", ["prepare.on_bad_rows=ignore"], None),
    ("logger mode", ["logger=wandb", "logger.wandb.mode=cloud"], None),
    ("report without dir", ["stage=report"], None),
    ("search ckpt missing", ["stage=cluster", "search.ckpt=/nonexistent/best.ckpt"], None),
    ("transfer from nowhere", ["transfer.from=/nonexistent/run"], None),
    ("raw file missing", ["dataset=criteo", "dataset.raw_path=/nonexistent/train.txt"], None),
    ("predict without a run", ["stage=predict", "predict.input=x.txt"], None),
    (
        "predict from a non-run dir",
        ["stage=predict", "predict.run=/tmp", "predict.input=/etc/hostname"],
        None,
    ),
    ("export format", ["stage=export", "export.run=/tmp", "export.formats=[tflite]"], None),
    ("router epochs 0", ["cluster.router.epochs=0"], None),
    ("router features", ["cluster.router.features=gate"], None),
    ("criteo: short row", ["dataset=criteo"], "criteo_short_row"),
    ("criteo: bad label", ["dataset=criteo"], "criteo_bad_label"),
    ("avazu: missing column", ["dataset=avazu"], "avazu_missing_column"),
    ("criteo: truncated gz", ["dataset=criteo"], "criteo_truncated_gz"),
]


def _fixture(kind: str, tmp: Path) -> Path:
    fmt = kind.split("_")[0]
    good = generate(fmt, 3000, tmp / f"{kind}.src", seed=1)
    lines = Path(good).read_text().splitlines(keepends=True)
    if kind == "criteo_short_row":
        lines[1500] = "\t".join(lines[1500].split("\t")[:20]) + "\n"
    elif kind == "criteo_bad_label":
        lines[700] = "x" + lines[700][1:]
    elif kind == "avazu_missing_column":
        header = lines[0].rstrip("\n").split(",")
        keep = [i for i, h in enumerate(header) if h != "site_id"]
        lines = [",".join(ln.rstrip("\n").split(",")[i] for i in keep) + "\n" for ln in lines]
    out = tmp / f"{kind}.{'csv' if fmt == 'avazu' else 'txt'}"
    if kind == "criteo_truncated_gz":
        data = gzip.compress("".join(lines).encode())
        out = tmp / f"{kind}.txt.gz"
        out.write_bytes(data[: len(data) // 2])
        return out
    out.write_text("".join(lines))
    return out


def run_case(overrides: list[str], env: dict, tmp: Path, timeout: float) -> dict:
    out_dir = tmp / f"run-{time.monotonic_ns()}"
    data_dir = tmp / f"data-{time.monotonic_ns()}"
    data = [] if any(o.startswith("dataset=") for o in overrides) else SYNTHETIC
    cmd = [sys.executable, "-m", "ihas_lightning", *BASE, *data, *overrides,
           f"paths.output_dir={out_dir}", f"paths.data_dir={data_dir}"]  # fmt: skip
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired:
        rc, err = "timeout", ""
    secs = time.perf_counter() - t0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    trained = any((out_dir / d / "best.ckpt").exists() for d in ("search", "base/search"))
    first = lines[0].replace(str(tmp), "$TMP") if lines else ""  # no machine path in a committed file
    return {
        "exit": rc,
        "stderr_lines": len(lines),
        "first_line": first[:300],
        "seconds": round(secs, 2),
        "trained_before_error": trained,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", help="run against this checkout's src/ (default: the installed package)")
    ap.add_argument("--out", default="experiments/results/bad_inputs")
    ap.add_argument("--label", default="after")
    ap.add_argument("--timeout", type=float, default=180.0)
    args = ap.parse_args(argv)
    env = dict(os.environ, WANDB_MODE="offline", IHAS_SHARED_DIR="/nonexistent-shared")
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
        env["IHAS_CONF_DIR"] = str(Path(args.src).resolve().parent / "conf")
    rows = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for name, overrides, fixture in CASES:
            ov = list(overrides)
            if fixture:
                ov.append(f"dataset.raw_path={_fixture(fixture, tmp)}")
            r = {"case": name, "overrides": " ".join(overrides), **run_case(ov, env, tmp, args.timeout)}
            print(
                f"{name:38s} exit {r['exit']!s:>3} {r['seconds']:6.1f}s  {r['first_line'][:110]}", flush=True
            )
            rows.append(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}_{args.label}.json").write_text(json.dumps(rows, indent=1) + "\n")
    ok = sum(r["exit"] == 2 and r["stderr_lines"] == 1 and not r["trained_before_error"] for r in rows)
    md = [f"# Bad input, {args.label}: {ok}/{len(rows)} cases end in one line, exit 2, before training", "",
          "| case | overrides | exit | stderr lines | seconds | first line |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        first = r["first_line"].replace("|", "\\|")
        md.append(
            f"| {r['case']} | `{r['overrides']}` | {r['exit']} | {r['stderr_lines']} | {r['seconds']} | {first} |"
        )
    Path(f"{out}_{args.label}.md").write_text("\n".join(md) + "\n")
    print(f"{ok}/{len(rows)} cases: one line, exit 2, before training -> {out}_{args.label}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
