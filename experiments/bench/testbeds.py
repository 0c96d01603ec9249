"""Low-CTR test beds (issue 28): real CTR logs have 1-3% positives, the shared samples about 20%.

* ``<criteo|avazu>-ctr<3|1>``: the shared sample's train, dev and test files pooled, every negative
  kept and a seeded subset of the positives, so that positives are ~3% (or ~1%) of the rows; one raw
  file, split 80/10/10 at random by the pipeline (``dataset.raw_path``; the given split's 400-row
  files would hold 3-12 positives each);
* ``gen-criteo-ctr3``: generated Criteo (:mod:`ihas_lightning.data.rawgen`, ``--positive-rate 0.03``),
  1M rows by default;
* ``synthetic-ctr3``: the planted synthetic data at a ~3% base rate (``dataset=synthetic_ctr3``).

Each builder writes its file once (atomically) under ``root`` and returns the Hydra overrides of the
setting. ``python -m experiments.bench.testbeds --root DIR`` builds them all and prints their rates.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from .runs import SAMPLES, shared_dir

LOW_CTR = {"ctr3": 0.03, "ctr1": 0.01}
SETTINGS = [
    "criteo-ctr3",
    "criteo-ctr1",
    "avazu-ctr3",
    "avazu-ctr1",
    "gen-criteo-ctr3",
    "synthetic-ctr3",
]
DOWNSAMPLE_SEED = 11
GEN_ROWS = 1_000_000


def downsample_positives(lines: list[str], label_of, rate: float, seed: int) -> list[str]:
    """Every negative line and a seeded sample of the positive lines, in their order, so that positives
    are ``rate`` of the result (all positives when there are too few)."""
    labels = [label_of(ln) for ln in lines]
    pos = [i for i, y in enumerate(labels) if y]
    neg = len(lines) - len(pos)
    k = min(len(pos), round(rate * neg / (1.0 - rate)))
    keep = set(random.Random(seed).sample(pos, k))
    return [ln for i, ln in enumerate(lines) if not labels[i] or i in keep]


def _sample_lines(dataset: str) -> tuple[list[str], list[str]]:
    """(header lines, body lines) of the shared sample's three files pooled (SystemExit when absent)."""
    d = shared_dir().joinpath(*SAMPLES[dataset])
    head: list[str] = []
    body: list[str] = []
    for name in ("train.csv", "dev.csv", "test.csv"):
        f = d / name
        if not f.is_file():
            raise SystemExit(f"error: {f}: shared sample missing (set IHAS_SHARED_DIR to the shared/ folder)")
        lines = f.read_text().splitlines(keepends=True)
        if dataset == "avazu":
            head, lines = lines[:1], lines[1:]
        body += lines
    return head, body


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def low_ctr_sample(dataset: str, level: str, root: Path) -> Path:
    """The shared ``dataset`` sample with positives downsampled to ``LOW_CTR[level]`` (written once)."""
    out = Path(root) / f"{dataset}-{level}.txt"
    if out.is_file():
        return out
    head, body = _sample_lines(dataset)
    if dataset == "avazu":  # id,click,...
        label_of = lambda ln: ln.split(",", 2)[1] == "1"  # noqa: E731
    else:  # label<TAB>...
        label_of = lambda ln: ln.split("\t", 1)[0] == "1"  # noqa: E731
    kept = downsample_positives(body, label_of, LOW_CTR[level], DOWNSAMPLE_SEED)
    return _write(out, "".join(head + kept))


def generated_criteo(root: Path, rows: int = GEN_ROWS, rate: float = 0.03, seed: int = 5) -> Path:
    from ihas_lightning.data.rawgen import generate

    out = Path(root) / f"gen-criteo-{rows}-p{rate:g}.txt"
    return out if out.is_file() else generate("criteo", rows, out, seed=seed, positive_rate=rate)


def overrides(name: str, root: Path, prepared_root: Path) -> list[str]:
    """Hydra overrides of a test bed (its raw file built under ``root`` first)."""
    if name == "synthetic-ctr3":
        return ["dataset=synthetic_ctr3", f"paths.data_dir={prepared_root}"]
    if name == "gen-criteo-ctr3":
        raw = generated_criteo(root)
        return ["dataset=criteo", f"dataset.raw_path={raw}", f"dataset.prepared_dir={prepared_root / name}"]
    dataset, level = name.split("-")
    raw = low_ctr_sample(dataset, level, root)
    return [f"dataset={dataset}", f"dataset.raw_path={raw}", f"dataset.prepared_dir={prepared_root / name}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="build the low-CTR test beds")
    ap.add_argument("--root", required=True, type=Path)
    args = ap.parse_args(argv)
    for name in SETTINGS:
        ov = overrides(name, args.root, args.root / "prepared")
        raw = next((o.split("=", 1)[1] for o in ov if o.startswith("dataset.raw_path=")), None)
        if raw:
            lines = Path(raw).read_text().splitlines()
            body = lines[1:] if name.startswith("avazu") else lines
            sep = "," if name.startswith("avazu") else "\t"
            col = 1 if name.startswith("avazu") else 0
            pos = sum(ln.split(sep)[col] == "1" for ln in body)
            print(f"{name}: {raw}: {len(body):,} rows, {pos:,} positives ({pos / len(body):.2%})")
        else:
            print(f"{name}: {' '.join(ov)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
