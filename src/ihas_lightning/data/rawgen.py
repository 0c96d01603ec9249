"""Raw-format generator for scale tests: Criteo-like TSV and Avazu-like CSV text at any size.

The real Criteo/Avazu dumps cannot be redistributed, and the shared samples are only ~8k rows, so
the preprocessing pipeline (``stage=prepare``) is benchmarked on generated files with the same
format and similar statistics:

* **Criteo** (tab-separated, no header): ``label, I1..I13, C1..C26``. Labels are ~25% positive,
  ~20% of integer cells are missing (empty), integers are heavy-tailed (with ``-1`` in ``I2`` as
  in the real data), categorical values are 8-hex-digit hashes. Each C field's cardinality is the
  real full-data cardinality scaled with the row count (the biggest fields have millions of
  distinct values at 45.8M rows); values are a Zipf-like head plus a uniform long tail, so that,
  as in the real data, most distinct values of the large fields are rare.
* **Avazu** (comma-separated with header ``id,click,hour,C1,...,C21``): the same idea with the
  real Avazu cardinalities; ``hour`` spans ten days of ``YYMMDDHH``.

Everything is vectorised numpy + ``pyarrow.csv.write_csv`` in chunks of ``CHUNK`` rows, so memory
stays flat for any ``--rows``. Output is deterministic for a given ``--seed``.

Usage: ``python -m ihas_lightning.data.rawgen --format criteo --rows 5000000 --out /tmp/c.txt [--gz]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

CHUNK = 250_000

CRITEO_ROWS = 45_840_617
# distinct values per C field in the full Criteo Kaggle train set (sum ~33.8M)
CRITEO_CARD = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip
# share of empty cells per C field (the real data has many empties in C19..C26)
CRITEO_CMISS = [0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0,
                0.0, 0.0, 0.03, 0.0, 0.0, 0.44, 0.44, 0.03, 0.0, 0.0, 0.44, 0.04, 0.44]  # fmt: skip

AVAZU_ROWS = 40_428_967
AVAZU_COLS = [
    ("C1", 7, "int"), ("banner_pos", 7, "int"), ("site_id", 4737, "hex"), ("site_domain", 7745, "hex"),
    ("site_category", 26, "hex"), ("app_id", 8552, "hex"), ("app_domain", 559, "hex"),
    ("app_category", 36, "hex"), ("device_id", 2686408, "hex"), ("device_ip", 6729486, "hex"),
    ("device_model", 8251, "hex"), ("device_type", 5, "int"), ("device_conn_type", 4, "int"),
    ("C14", 2626, "int"), ("C15", 8, "int"), ("C16", 9, "int"), ("C17", 435, "int"), ("C18", 4, "int"),
    ("C19", 68, "int"), ("C20", 172, "int"), ("C21", 60, "int"),
]  # fmt: skip

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a counter-based hash."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def scaled_cardinality(full: int, rows: int, full_rows: int) -> int:
    """Cardinality at ``rows``: small fields keep their full size, large ones scale with the rows."""
    return int(min(full, max(min(full, 1000), round(full * rows / full_rows))))


def _hex8(v: np.ndarray, missing: np.ndarray | None = None) -> pa.Array:
    """uint32 values -> Arrow strings of 8 lowercase hex digits (empty where ``missing``)."""
    n = len(v)
    v = v.astype(np.uint32)
    shifts = np.arange(28, -4, -4, dtype=np.uint32)
    digits = _HEX[(v[:, None] >> shifts[None, :]) & np.uint32(0xF)]  # (n, 8) uint8
    if missing is None:
        data = digits.reshape(-1)
        offsets = np.arange(0, 8 * (n + 1), 8, dtype=np.int32)
    else:
        keep = ~missing
        data = digits[keep].reshape(-1)
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(np.where(keep, 8, 0), out=offsets[1:])
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(data)))


def _zipf_tail(rng: np.random.Generator, n: int, card: int, rows: int, a: float = 1.2) -> np.ndarray:
    """Ranks in [0, card): a truncated power law (Zipf-like head) mixed with a uniform tail.

    The tail share grows with card/rows, so large fields get mostly-rare values as in real logs."""
    u = rng.random(n)
    hi = float(card) + 1.0
    x = (((hi ** (1.0 - a)) - 1.0) * u + 1.0) ** (1.0 / (1.0 - a))
    ranks = np.minimum(np.floor(x).astype(np.int64) - 1, card - 1)
    tail_share = min(0.45, 1.6 * card / max(rows, 1))
    if tail_share > 0.001:
        tail = rng.random(n) < tail_share
        ranks[tail] = rng.integers(0, card, size=int(tail.sum()))
    return ranks


def _token(field_id: int, ranks: np.ndarray, seed: int) -> np.ndarray:
    """Stable per-field 32-bit token for each rank (what a hashed raw value looks like)."""
    salt = np.uint64((seed * 1_000_003 + field_id * 7919) & 0xFFFFFFFF) << np.uint64(32)
    return (splitmix64(ranks.astype(np.uint64) ^ salt) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def intercept_for_rate(signal: np.ndarray, rate: float) -> float:
    """The intercept b with mean(sigmoid(signal + b)) = ``rate`` (bisection; the mean is monotone in b)."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"--positive-rate must be in (0, 1), got {rate}")
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(np.mean(1.0 / (1.0 + np.exp(-(signal + mid))))) < rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def criteo_chunk(
    rng: np.random.Generator, n: int, rows: int, seed: int, positive_rate: float | None = None
) -> pa.Table:
    """One chunk of Criteo rows; ``positive_rate`` sets the labels' expected rate (default ~25%) by
    moving the intercept of the hidden logistic model, the signal unchanged."""
    cols: dict[str, pa.Array] = {}
    signal = np.zeros(n)
    ints = []
    for i in range(13):
        miss = rng.random(n) < (0.2 if i not in (1, 4) else 0.02)
        vals = np.floor(np.exp(rng.normal(1.0 + 0.25 * i, 1.2 + 0.1 * i, size=n))).astype(np.int64)
        vals[rng.random(n) < 0.15] = 0
        if i == 1:
            vals[rng.random(n) < 0.08] = -1
        if i in (0, 5):
            signal += np.where(miss, 0.0, np.log1p(np.maximum(vals, 0)) * 0.15)
        ints.append(pa.array(vals, mask=miss))
    cats = []
    for j, (full, pmiss) in enumerate(zip(CRITEO_CARD, CRITEO_CMISS)):
        card = scaled_cardinality(full, rows, CRITEO_ROWS)
        ranks = _zipf_tail(rng, n, card, rows)
        if j in (1, 5, 13):  # a few fields carry signal through their head values
            signal += np.where(ranks < 8, (ranks % 4 - 1.5) * 0.4, 0.0)
        miss = rng.random(n) < pmiss if pmiss > 0 else None
        cats.append(_hex8(_token(j, ranks, seed), miss))
    b = -1.2 if positive_rate is None else intercept_for_rate(signal, positive_rate)
    p = 1.0 / (1.0 + np.exp(-(signal + b)))
    cols["label"] = pa.array((rng.random(n) < p).astype(np.int8))
    for i, a in enumerate(ints):
        cols[f"I{i + 1}"] = a
    for j, a in enumerate(cats):
        cols[f"C{j + 1}"] = a
    return pa.table(cols)


def avazu_chunk(rng: np.random.Generator, n: int, rows: int, seed: int, start: int) -> pa.Table:
    cols: dict[str, pa.Array] = {}
    cols["id"] = pa.array(splitmix64(np.arange(start, start + n, dtype=np.uint64) + np.uint64(seed)))
    # ten days 14102100..14103023, rows in time order as in the real file
    hour_idx = np.minimum((np.arange(start, start + n) * 240) // max(rows, 1), 239)
    day, hh = 21 + hour_idx // 24, hour_idx % 24
    cols["hour"] = pa.array(14100000 + day * 100 + hh)
    signal = np.zeros(n)
    for j, (name, full, kind) in enumerate(AVAZU_COLS):
        card = scaled_cardinality(full, rows, AVAZU_ROWS)
        ranks = _zipf_tail(rng, n, card, rows, a=1.3)
        if name in ("banner_pos", "site_category", "device_conn_type"):
            signal += np.where(ranks < 6, (ranks % 3 - 1.0) * 0.35, 0.0)
        if kind == "hex":
            cols[name] = _hex8(_token(j, ranks, seed))
        else:
            base = {"C1": 1001, "C14": 15000, "C20": 100000}.get(name, 0)
            vals = base + ranks
            if name == "C20":
                vals = np.where(rng.random(n) < 0.45, -1, vals)
            cols[name] = pa.array(vals.astype(np.int64))
    p = 1.0 / (1.0 + np.exp(-(signal - 1.2)))
    click = pa.array((rng.random(n) < p).astype(np.int8))
    table = {"id": cols["id"], "click": click, "hour": cols["hour"]}
    for name, _, _ in AVAZU_COLS:
        table[name] = cols[name]
    return pa.table(table)


def generate(
    fmt: str, rows: int, out: str | Path, seed: int = 0, gz: bool = False, positive_rate: float | None = None
) -> Path:
    """Write ``rows`` raw rows of ``fmt`` ('criteo' | 'avazu') to ``out`` (gzip if ``gz``);
    ``positive_rate`` (Criteo only) sets the expected share of positive labels."""
    if fmt not in ("criteo", "avazu"):
        raise ValueError(f"--format must be criteo or avazu, got {fmt!r}")
    if positive_rate is not None and (fmt != "criteo" or not 0.0 < positive_rate < 1.0):
        raise ValueError(f"--positive-rate must be in (0, 1) and needs --format criteo (got {positive_rate})")
    if rows < 1:
        raise ValueError(f"--rows must be >= 1, got {rows}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    sink = pa.CompressedOutputStream(str(tmp), "gzip") if gz else pa.OSFile(str(tmp), "wb")
    try:
        with sink:
            for k, start in enumerate(range(0, rows, CHUNK)):
                n = min(CHUNK, rows - start)
                rng = np.random.default_rng([seed, k])
                if fmt == "criteo":
                    t = criteo_chunk(rng, n, rows, seed, positive_rate)
                    opts = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
                else:
                    t = avazu_chunk(rng, n, rows, seed, start)
                    if k == 0:  # write_csv would quote the header names
                        sink.write((",".join(t.column_names) + "\n").encode())
                    opts = pacsv.WriteOptions(include_header=False, delimiter=",", quoting_style="none")
                pacsv.write_csv(t, sink, write_options=opts)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], prog="python -m ihas_lightning.data.rawgen"
    )
    ap.add_argument("--format", required=True, choices=["criteo", "avazu"])
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gz", action="store_true", help="gzip-compress the output")
    ap.add_argument("--positive-rate", type=float, default=None, help="Criteo: the labels' expected rate")
    args = ap.parse_args(argv)
    if args.rows < 1:
        ap.error(f"--rows must be >= 1, got {args.rows}")
    if args.positive_rate is not None and (args.format != "criteo" or not 0 < args.positive_rate < 1):
        ap.error(f"--positive-rate must be in (0, 1) and needs --format criteo (got {args.positive_rate})")
    t0 = time.perf_counter()
    path = generate(
        args.format, args.rows, args.out, seed=args.seed, gz=args.gz, positive_rate=args.positive_rate
    )
    dt = time.perf_counter() - t0
    print(f"wrote {args.rows} {args.format} rows to {path} in {dt:.1f}s ({args.rows / dt:,.0f} rows/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
