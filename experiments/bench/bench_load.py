"""Training speed on a busy machine (issue 15), part of ``make bench-train``: Base and the bi-level
search through ``lightning.Trainer`` (the modules and the trainer callbacks of ``stage=search``), quiet
and with one core kept busy by a spinning process that this benchmark starts and stops itself.

Thread settings, side by side in one process on the same batches:

* ``adaptive`` -- opt-in ``trainer.threads=adaptive``: the usable cores, re-chosen while the fit runs
  from step times and the load of other processes (:func:`ihas_lightning.threads.thread_tuner`, added by
  ``training.build_trainer``); the default before issue 30;
* ``auto``     -- the default ``trainer.threads=auto``: the usable cores chosen once, kept for the whole
  run (bitwise reproducible under any load);
* ``one``      -- 1 thread;

plus the textbook dense-Adam loop (1 thread and the usable cores; the faster one is the reference) and the
floor: the same loop without the embedding update (``plain_loop(kind="floor")``), so floor / textbook is
the most any loop can gain over the textbook loop on that vocabulary.
Two vocabularies: ~55k ids (what 1M generated Criteo rows give after ``min_count=10``) and ~1M ids.
Each cell is the fastest of ``--rounds`` interleaved rounds (steady state: warm-up batches untimed).
Writes ``experiments/results/bench_train_load.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .bench_train import RESULTS, criteo_like_vocab, make_batches, plain_loop

SETTINGS = ("adaptive", "auto", "one")


def _spin(core: int) -> None:  # pragma: no cover - runs in the spinner process
    try:
        os.sched_setaffinity(0, {core})
    except (AttributeError, OSError):
        pass
    while True:
        pass


class Load:
    """One process spinning on one core (the last usable one), for the ``with`` block."""

    def __init__(self, on: bool):
        self.on, self.proc = on, None

    def __enter__(self):
        if self.on:
            core = sorted(os.sched_getaffinity(0))[-1]
            self.proc = mp.get_context("spawn").Process(target=_spin, args=(core,), daemon=True)
            self.proc.start()
            time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.join()


def lightning_fit(
    vocab: list[int],
    batches,
    method: str,
    setting: str,
    cores: int,
    warmup: int,
    stats: dict[str, float] | None = None,
) -> float:
    """Samples/s of one fit over ``batches`` (CTRModule or SearchModule) with a thread ``setting``;
    ``stats`` (if given) gets ``probe_share``: the share of the timed fit the thread tuner spent at the
    count it was checking, and ``skipped``: the probes it skipped because other processes kept the spare
    cores busy."""
    import lightning as L
    from omegaconf import OmegaConf

    from ihas_lightning import threads
    from ihas_lightning.modules.ctr import CTRModule
    from ihas_lightning.modules.search import SearchModule
    from ihas_lightning.training import build_trainer, throughput_callback

    from .bench_train import GATE, MODEL, _Batches

    torch.set_num_threads(1 if setting == "one" else cores)
    threads._CHOSEN.pop("tuned", None)  # each fit as the first of a fresh process (the worst case)
    torch.manual_seed(0)
    model = dict(MODEL, embedding_optimizer="sparse_adam")
    if method == "base":
        module = CTRModule(vocab, model)
    else:
        module = SearchModule(
            vocab, model, dict(GATE, lambda_reg=1e-4, lr=1e-3), pretrain_epochs=0, search_every=100
        )
        module.set_search_loader(batches[::7])
    thr = throughput_callback(skip_batches=warmup)
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                                        "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 0,
                                        "threads": setting if setting in ("auto", "adaptive") else cores}})  # fmt: skip
    trainer = build_trainer(cfg, 1, [thr], None, Path("."), enable_checkpointing=False)
    assert isinstance(trainer, L.Trainer)
    trainer.fit(module, train_dataloaders=_Batches(batches))
    tuner = next((c for c in trainer.callbacks if type(c).__name__ == "ThreadTuner"), None)
    if stats is not None and tuner is not None and thr.seconds:
        stats["probe_share"] = tuner.probe_seconds / thr.seconds
        stats["skipped"] = tuner.skipped
    return float(thr.samples_per_s or 0.0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=300, help="training batches per fit (batch 2048), quiet")
    ap.add_argument("--loaded-batches", type=int, default=300, help="the same with one core busy")
    ap.add_argument("--textbook-batches", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--vocabs", type=int, nargs="*", default=[55_000, 1_000_000])
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "ihas_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from ihas_lightning.allocator import tune
    from ihas_lightning.threads import usable_cores

    tune()  # as the CLI does (trainer.malloc_tuning=true)
    cores = usable_cores()
    t0 = time.perf_counter()
    res: dict[str, Any] = {"cores": cores, "torch": torch.__version__, "batch": 2048, "rounds": args.rounds,
                           "statistic": "fastest of the interleaved rounds", "cells": {}}  # fmt: skip
    for total in args.vocabs:
        vocab = criteo_like_vocab(total)
        data = make_batches(vocab, max(args.batches, args.textbook_batches), 2048)
        for loaded in (False, True):
            key = f"{sum(vocab)}_ids/{'one core busy' if loaded else 'quiet'}"
            best: dict[str, float] = {}
            runs: dict[str, list[float]] = {}
            probe_share: dict[str, list[float]] = {}
            skipped: dict[str, list[int]] = {}
            n = args.loaded_batches if loaded else args.batches
            with Load(loaded):
                for r in range(args.rounds):
                    for method in ("base", "search"):
                        for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:  # no order bias
                            stats: dict[str, float] = {}
                            sps = lightning_fit(vocab, data[:n], method, setting, cores, args.warmup, stats)
                            name = f"{method}/{setting}"
                            if "probe_share" in stats:
                                probe_share.setdefault(method, []).append(stats["probe_share"])
                                skipped.setdefault(method, []).append(stats["skipped"])
                            best[name] = max(best.get(name, 0.0), sps)
                            runs.setdefault(name, []).append(sps)
                            print(f"{key} {name}: {sps:,.0f}", flush=True)
                    for threads in sorted({1, cores}):
                        torch.set_num_threads(threads)
                        for kind in ("textbook", "floor"):
                            sps = plain_loop(vocab, data[: args.textbook_batches], kind, 3)["samples_per_s"]
                            best[kind] = max(best.get(kind, 0.0), sps)
                torch.set_num_threads(cores)
            res["cells"][key] = {k: round(v) for k, v in best.items()}
            # the same round's settings run back to back: their ratio is less exposed to the machine's drift
            res.setdefault("paired", {})[key] = {
                f"{m}/{s} vs {t}": round(statistics.median(a / b for a, b in zip(runs[f"{m}/{s}"], runs[f"{m}/{t}"])), 2)
                for m in ("base", "search") for s, t in (("adaptive", "one"), ("adaptive", "auto"))
            }  # fmt: skip
            res.setdefault("runs", {})[key] = {k: [round(x) for x in v] for k, v in runs.items()}
            res.setdefault("probe_share", {})[key] = {
                m: round(statistics.median(v), 4) for m, v in probe_share.items()
            }
            res.setdefault("skipped_probes", {})[key] = {m: statistics.median(v) for m, v in skipped.items()}
    # ratios: against the textbook loop and 1 thread under the same load, and loaded / quiet
    ratios: dict[str, Any] = {}
    for key, c in res["cells"].items():
        ratios[key] = {
            f"{m}/{s} vs textbook": round(c[f"{m}/{s}"] / c["textbook"], 2)
            for m in ("base", "search")
            for s in ("auto", "adaptive")
        }
        ratios[key]["floor vs textbook (the most any loop can gain)"] = round(c["floor"] / c["textbook"], 2)
        ratios[key].update(
            {
                f"{m}/{s} vs {t}": round(c[f"{m}/{s}"] / c[f"{m}/{t}"], 2)
                for m in ("base", "search")
                for s, t in (("adaptive", "one"), ("adaptive", "auto"))
            }
        )
        if key.endswith("one core busy"):
            q = res["cells"][key.replace("one core busy", "quiet")]
            for m in ("base", "search"):
                for s in SETTINGS:
                    ratios[key][f"{m}/{s} loaded / quiet"] = round(c[f"{m}/{s}"] / q[f"{m}/{s}"], 2)
    res["ratios"] = ratios
    res["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train_load.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "bench_train_load.md").write_text(markdown(res))
    print(markdown(res))
    return res


def markdown(r: dict[str, Any]) -> str:
    md = [f"# Training speed quiet and with one core busy ({r['cores']} usable cores, torch {r['torch']})", "",
          "Samples/s through `lightning.Trainer` (the modules and trainer callbacks of `stage=search`), batch "
          f"{r['batch']}, {r['statistic']} ({r['rounds']}). `adaptive`: opt-in (usable cores, re-chosen while "
          "the fit runs from step times and other processes' load; the default before issue 30); `auto`: the default, the usable cores "
          "chosen once and kept (bitwise reproducible); "
          "`one`: 1 thread. `textbook`: the dense-Adam loop (the faster of 1 thread and the usable cores); "
          "`floor`: that loop without the embedding update (lookup, MLP forward and backward down to the "
          "looked-up rows, MLP Adam), the most any loop that trains this model can reach. "
          "The busy core: a process spinning on it, started and stopped by the benchmark.", "",
          "| vocabulary / load | base adaptive | base auto | base one | search adaptive | search auto | search one | textbook | floor |",
          "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, c in r["cells"].items():
        md.append(f"| {key} | " + " | ".join(f"{c[k]:,}" for k in (
            "base/adaptive", "base/auto", "base/one", "search/adaptive", "search/auto", "search/one", "textbook", "floor")) + " |")  # fmt: skip
    md += ["", "| vocabulary / load | ratios (of the fastest rounds) |", "|---|---|"]
    for key, rr in r["ratios"].items():
        md.append(f"| {key} | " + ", ".join(f"{k} {v:.2f}" for k, v in rr.items()) + " |")
    if r.get("paired"):
        md += ["", "Adaptive vs 1 thread and vs auto, paired: the median over rounds of each round's ratio (the fits of a round run "
               "back to back, in reversed order every other round, so a drift of the machine's speed between rounds "
               "cancels). Probing: the median share of adaptive's timed fit spent at the count it was checking, "
               "an upper bound of what re-checking cost; skipped: the median number of probes of more threads "
               "a fit skipped because other processes kept the spare core busy:", "",
               "| vocabulary / load | base adaptive / one | search adaptive / one | base adaptive / auto | "
               "search adaptive / auto | per round, adaptive / one (base; search) | "
               "adaptive's time probing the other count (base; search) | skipped probes (base; search) |",
               "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for key, pr in r["paired"].items():
            ru = r["runs"][key]
            per = "; ".join(", ".join(f"{a / b:.2f}" for a, b in zip(ru[f"{m}/adaptive"], ru[f"{m}/one"]))
                            for m in ("base", "search"))  # fmt: skip
            ps = r.get("probe_share", {}).get(key, {})
            probe = "; ".join(f"{100 * ps[m]:.1f}%" if m in ps else "-" for m in ("base", "search"))
            sk = r.get("skipped_probes", {}).get(key, {})
            skip = "; ".join(f"{sk[m]:g}" if m in sk else "-" for m in ("base", "search"))
            md.append(f"| {key} | {pr['base/adaptive vs one']:.2f} | {pr['search/adaptive vs one']:.2f} "
                      f"| {pr['base/adaptive vs auto']:.2f} | {pr['search/adaptive vs auto']:.2f} | {per} | {probe} "
                      f"| {skip} |")  # fmt: skip
    md += ["", f"{r['seconds']:.0f} s.", ""]
    return "\n".join(md)


if __name__ == "__main__":
    main()
