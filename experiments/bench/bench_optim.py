"""The row-wise Adam's duplicate merge, side by side (issue 15: a sparse step with fewer, larger ops):
``torch.unique`` (a sort of the batch's ~80k row ids) against a scan of the table's rows (flags, their
nonzero, a slot per row; :meth:`ihas_lightning.optim.RowwiseAdam.dedupe`), which the optimizer uses when
the table has at most ``scan_factor`` rows per looked-up id. One Base training step (DLRM, batch 2048,
39 fields, Zipf-like ids) at 1 and 2 threads; each cell the fastest of ``--rounds`` interleaved rounds,
and the final weights compared bitwise. Writes ``experiments/results/bench_optim.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ihas_lightning.models import DLRM
from ihas_lightning.optim import RowwiseAdam

from .bench_train import RESULTS, criteo_like_vocab, make_batches


def step_ms(
    vocab: list[int], data, threads: int, scan_factor: int, warmup: int = 5
) -> tuple[float, torch.Tensor]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    old, RowwiseAdam.scan_factor = RowwiseAdam.scan_factor, scan_factor
    try:
        m = DLRM(vocab, 16)
        emb = RowwiseAdam(m.embedding_parameters(), lr=1e-3, weight_decay=1e-6)
        dense = torch.optim.Adam(m.dense_parameters(), lr=1e-3, weight_decay=1e-6)
        t0 = 0.0
        for i, (x, y) in enumerate(data):
            if i == warmup:
                t0 = time.perf_counter()
            emb.zero_grad(set_to_none=True)
            dense.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(m(x), y).backward()
            emb.step()
            dense.step()
        ms = (time.perf_counter() - t0) / (len(data) - warmup) * 1e3
    finally:
        RowwiseAdam.scan_factor = old
    return ms, torch.cat([p.detach().flatten() for p in m.parameters()])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocabs", type=int, nargs="*", default=[55_000, 100_000, 250_000, 1_000_000])
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    before = torch.get_num_threads()
    rows = []
    for total in args.vocabs:
        vocab = criteo_like_vocab(total)
        data = make_batches(vocab, args.batches, 2048)
        for threads in (1, 2):
            best = {"sort": float("inf"), "scan": float("inf")}
            weights = {}
            for _ in range(args.rounds):
                for name, factor in (("sort", 0), ("scan", 10**9)):
                    ms, w = step_ms(vocab, data, threads, factor)
                    best[name], weights[name] = min(best[name], ms), w
            used = "scan" if sum(vocab) <= RowwiseAdam.scan_factor * 2048 * len(vocab) else "sort"
            rows.append({"ids": sum(vocab), "threads": threads, "sort_ms": round(best["sort"], 2),
                         "scan_ms": round(best["scan"], 2), "sort_over_scan": round(best["sort"] / best["scan"], 3),
                         "bitwise_equal": bool(torch.equal(weights["sort"], weights["scan"])), "default_uses": used})  # fmt: skip
            print(rows[-1], flush=True)
    torch.set_num_threads(before)
    res = {"torch": torch.__version__, "batch": 2048, "fields": 39, "rounds": args.rounds, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_optim.json").write_text(json.dumps(res, indent=1) + "\n")
    md = ["# Row-wise Adam: duplicate merge by sort vs by scan (ms per Base step, batch 2048, 39 fields)", "",
          "| ids | threads | sort (torch.unique) | scan (flags) | sort / scan | weights bitwise equal | default uses |",
          "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        md.append(f"| {r['ids']:,} | {r['threads']} | {r['sort_ms']:.2f} | {r['scan_ms']:.2f} | {r['sort_over_scan']:.2f} | "
                  f"{r['bitwise_equal']} | {r['default_uses']} |")  # fmt: skip
    (out / "bench_optim.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return res


if __name__ == "__main__":
    main()
