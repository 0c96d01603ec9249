"""Training-throughput benchmark: our Lightning stages vs the textbook dense-Adam loop (``make bench-train``).

Part 1, throughput on a Criteo-scale vocabulary (39 fields, ~1M ids x 16 dims, batch 2048), all in
ONE process on the same pre-generated Zipf-like batches and the same DLRM (embedding + MLP (16, 8)):

* ``textbook_dense_adam``  plain torch loop, ``nn.Embedding`` dense gradients + one
  ``torch.optim.Adam`` over all parameters (the loop of the paper / pytorch-fm / FuxiCTR);
* ``textbook_search``      the same loop for the search model (same gated DLRM): stochastic gates
  every batch, one dense-Adam model optimizer, and a gate Adam step on a search batch every
  ``search_every`` = 100 batches; the reference for ``lightning_search`` ("same model");
* ``fused_dense_adam``     the same with ``Adam(fused=True)``;
* ``plain_sparse_adam``    plain torch loop with our sparse gradients + :class:`RowwiseAdam`;
* ``lightning_base``       ``CTRModule`` through ``lightning.Trainer`` (``method=base``);
* ``lightning_search``     ``SearchModule`` in its bi-level phase (stochastic gates every batch,
  one gate step on a search batch every ``search_every`` = 100 batches, as in the paper);
  ``lightning_search_logit_draw`` the same with the model step's mask drawn in the logit form
  (``z + logit(u) > 0``, the code before the ``u < p`` draw): the search's before/after side by side;
* ``search_parts``         the search batch itemised op by op (:func:`search_parts`).
* ``lightning_<method>``   the same ``SearchModule`` in the search phase of each baseline, built from
  its ``conf/method/<method>.yaml`` exactly as ``stage=search`` builds it (selector, architecture
  update and its frequency, the method's embedding optimizer: OptFS steps the whole table with dense
  Adam, as its pruning needs). Compared side by side with ``lightning_base`` (``x base``).

Samples/s are steady state: warm-up batches are not timed; Lightning's ``fit()`` set-up is
excluded (timed per batch by a callback). The setups run interleaved for ``--rounds`` rounds and
each reports its fastest round (and the median): on a shared 2-core machine a burst of load from
another process otherwise decides the ranking (with 2 OpenMP threads a busy core can slow large
elementwise ops tenfold). ``--threads`` pins torch's thread count.

Part 2, AUC parity: the Base model trained with ``sparse_adam`` vs ``dense_adam`` on the planted
synthetic dataset for a few seeds (same data order per seed); we report the mean val AUC of each
and their mean difference (target: within 0.001).

Writes ``experiments/results/bench_train.json`` and ``.md``. Runtime: a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ihas_lightning.models import DLRM
from ihas_lightning.optim import build_embedding_optimizer

RESULTS = Path(
    os.environ.get("IHAS_RESULTS_DIR", Path(__file__).resolve().parents[2] / "experiments" / "results")
)
MODEL = {"embed_dim": 16, "hidden": [16, 8], "lr": 1e-3, "weight_decay": 1e-6, "batch_size": 2048}


def criteo_like_vocab(total: int = 1_000_000, fields: int = 39, seed: int = 0) -> list[int]:
    """39 vocab sizes summing to ~``total``, log-uniformly spread like Criteo's (a few huge fields)."""
    rng = np.random.default_rng(seed)
    w = np.exp(rng.uniform(np.log(10), np.log(total), fields))
    sizes = np.maximum(4, (w / w.sum() * total).astype(int))
    return [int(s) for s in sizes]


def make_batches(
    vocab: list[int], n: int, batch: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of Zipf-like ids (int32 [B, F]) and labels from a hidden logistic model."""
    g = torch.Generator().manual_seed(seed)
    v = torch.tensor(vocab, dtype=torch.float64)
    out = []
    for _ in range(n):
        u = torch.rand(batch, len(vocab), generator=g, dtype=torch.float64)
        ids = (v.pow(u) - 1).long().clamp_max_(v.long() - 1).int()  # log-uniform ranks ~ Zipf(1)
        logit = ((ids[:, :3].long() * 2654435761) % 997).float().div(997).sub(0.5).sum(1) * 2 - 1
        y = (torch.rand(batch, generator=g) < torch.sigmoid(logit)).float()
        out.append((ids, y))
    return out


GATE = {"tau": 0.1, "instance_wise": True, "bins": 20, "init_bias": 3.0}


def plain_loop(vocab: list[int], batches, kind: str, warmup: int, search_every: int = 100) -> dict[str, Any]:
    """A plain torch training loop; ``kind``: textbook (one dense Adam), fused, sparse (ours),
    textbook_search (the textbook loop for the gated search model, with its gate steps), or floor: what
    every loop that trains this model does besides updating the embedding table -- the lookup, the MLP's
    forward and backward down to the looked-up rows, and the MLP's Adam -- so textbook / floor bounds how
    much faster than the textbook loop any loop can be (an embedding update that costs nothing)."""
    from ihas_lightning.models import gate_regularizer

    torch.manual_seed(0)
    search = kind == "textbook_search"
    model = DLRM(vocab, 16, hidden=(16, 8), sparse=(kind == "sparse"), gate=GATE if search else None)
    gate_opt = torch.optim.Adam(model.gate_parameters(), lr=1e-3, weight_decay=1e-6) if search else None
    if search:
        opts = [
            torch.optim.Adam(
                model.embedding_parameters() + model.dense_parameters(), lr=1e-3, weight_decay=1e-6
            )
        ]
    elif kind == "sparse":
        opts = [
            build_embedding_optimizer("sparse_adam", model.embedding_parameters(), 1e-3, 1e-6),
            torch.optim.Adam(model.dense_parameters(), lr=1e-3, weight_decay=1e-6),
        ]
    elif kind == "floor":
        opts = [torch.optim.Adam(model.dense_parameters(), lr=1e-3, weight_decay=1e-6)]
    else:
        opts = [torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6, fused=(kind == "fused"))]
    secs, samples = 0.0, 0
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        for o in opts:
            o.zero_grad(set_to_none=True)
        if kind == "floor":
            with torch.no_grad():
                e = model.embed(x)
            logits = model.backbone(e.requires_grad_(True), x)  # the grad reaches the rows, not the table
        else:
            logits = model(x, "stochastic" if search else "open")
        loss = F.binary_cross_entropy_with_logits(logits, y)
        loss.backward()
        for o in opts:
            o.step()
        if search and i % search_every == 0:  # the gate step on a search batch (here: the batch 7 ahead)
            xs, ys = batches[(i + 7) % len(batches)]
            gate_opt.zero_grad(set_to_none=True)
            logits, _, p = model.forward_with_gate(xs, "stochastic")
            (F.binary_cross_entropy_with_logits(logits, ys) + gate_regularizer(p, 1e-4)).backward()
            gate_opt.step()
        if i >= warmup:
            secs += time.perf_counter() - t0
            samples += len(y)
    return {
        "samples_per_s": samples / secs,
        "timed_batches": len(batches) - warmup,
        "final_loss": float(loss.detach()),
    }


def logit_draw(gate, z: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """The search's model-step draw before commit "u < p": the Gumbel-Max form ``z + logit(u) > 0`` for
    every entry, also where z needs no gradient (``lightning_search_logit_draw``, the "before")."""
    score = z + torch.logit(gate.uniform_noise(z))
    hard = (score > 0).to(z.dtype)
    if not z.requires_grad:
        return hard
    soft = torch.sigmoid(score / gate.tau)
    return hard + (soft - soft.detach())


SEARCH_PARTS = ("zero_grad", "lookup", "gate_matmul", "gate_sigmoid", "draw", "mask_backbone_loss", "backward",
                "embedding_adam", "dense_adam", "gate_step")  # fmt: skip


def search_parts(vocab: list[int], batches, warmup: int, search_every: int = 100) -> dict[str, Any]:
    """The search phase's batch, itemised: :class:`SearchModule`'s model step (the gate frozen, reading
    the detached embedding: lookup, the N*d x N*d gate matmul, its sigmoid, the mask draw, the masked
    backbone and loss, backward, the sparse embedding Adam, the dense Adam) and its gate step every
    ``search_every`` batches (a second forward with the stochastic mask, backward to the gate, the gate's
    Adam; amortised per batch), timed op by op in a plain loop on the same batches. The draw is timed
    in both forms: ``u < p`` (what runs) and the logit form (``draw_logit``, before); the threshold
    searcher is not part of training (it runs in validation and the cluster stage)."""
    from ihas_lightning.models import gate_regularizer

    torch.manual_seed(0)
    model = DLRM(vocab, 16, hidden=(16, 8), sparse=True, gate=GATE)
    gate = model.gate
    emb_opt = build_embedding_optimizer("sparse_adam", model.embedding_parameters(), 1e-3, 1e-6)
    dense_opt = torch.optim.Adam(model.dense_parameters(), lr=1e-3, weight_decay=1e-6)
    gate_opt = torch.optim.Adam(model.gate_parameters(), lr=1e-3, weight_decay=1e-6)
    ms = dict.fromkeys((*SEARCH_PARTS, "draw_logit"), 0.0)
    timed, tick = 0, time.perf_counter
    for i, (x, y) in enumerate(batches):
        t = [tick()]
        emb_opt.zero_grad(set_to_none=True)
        dense_opt.zero_grad(set_to_none=True)
        t.append(tick())
        e = model.embed(x)
        t.append(tick())
        with torch.no_grad():
            z = gate.gate_logits(e.detach())
            t.append(tick())
            p = torch.sigmoid(z)
            t.append(tick())
            mask = gate.stochastic_mask(z, p)
            t.append(tick())
        loss = F.binary_cross_entropy_with_logits(model.backbone(e * mask, x), y)
        t.append(tick())
        loss.backward()
        t.append(tick())
        emb_opt.step()
        t.append(tick())
        dense_opt.step()
        t.append(tick())
        if i % search_every == 0:  # the gate step on a search batch (here: the batch 7 ahead)
            xs, ys = batches[(i + 7) % len(batches)]
            gate_opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                es = model.embed(xs)
            zs = gate.gate_logits(es)
            ps = torch.sigmoid(zs)
            logits = model.backbone(es * gate.stochastic_mask(zs, ps), xs)
            (F.binary_cross_entropy_with_logits(logits, ys) + gate_regularizer(ps, 1e-4)).backward()
            gate_opt.step()
        t.append(tick())
        with torch.no_grad():
            logit_draw(gate, z)
        t.append(tick())
        if i >= warmup:
            timed += 1
            for k, a, b in zip((*SEARCH_PARTS, "draw_logit"), t[:-1], t[1:]):
                ms[k] += 1000 * (b - a)
    ms = {k: v / timed for k, v in ms.items()}
    total = sum(ms[k] for k in SEARCH_PARTS)
    return {"ms_per_batch": ms, "total_ms": total, "samples_per_s": len(batches[0][1]) / total * 1000,
            "timed_batches": timed, "search_every": search_every}  # fmt: skip


class _Batches:
    """A re-iterable over ready batches (a plain list would be read by Lightning as several loaders)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def lightning_run(
    vocab: list[int], batches, method: str, warmup: int, search_every: int = 100, draw: str = "p"
) -> dict[str, Any]:
    import lightning as L

    from ihas_lightning.modules.ctr import CTRModule
    from ihas_lightning.modules.search import SearchModule
    from ihas_lightning.training import throughput_callback

    torch.manual_seed(0)
    model = dict(MODEL, embedding_optimizer="sparse_adam")
    if method == "base":
        module = CTRModule(vocab, model)
    elif method != "search":
        from ihas_lightning import method as methods
        from ihas_lightning.config import compose

        cfg = compose([f"method={method}"], output_dir=tempfile.mkdtemp())
        every = cfg.method.get("search_every")
        module = SearchModule(
            vocab, {**model, **{k: v for k, v in methods.model_cfg(cfg).items() if k == "embedding_optimizer"}},
            pretrain_epochs=0, search_every=int(every) if isinstance(every, int) else search_every,
            method=methods.spec(cfg, int(methods.setting(cfg, "max_epochs"))),
        )  # fmt: skip
        module.set_search_loader(batches[::7])
    else:
        gate = dict(GATE, lambda_reg=1e-4, polarization=True, lr=1e-3)
        module = SearchModule(vocab, model, gate, pretrain_epochs=0, search_every=search_every)
        module.set_search_loader(batches[::7])
        if draw == "logit":  # the before: the logit form of the draw in the model step too
            g = module.model.gate
            g.stochastic_mask = lambda z, p=None, g=g: logit_draw(g, z, p)
    thr = throughput_callback(skip_batches=warmup)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[thr],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=_Batches(batches))
    out = {"samples_per_s": thr.samples_per_s, "timed_batches": thr.batches - warmup}
    if method != "base":
        out["arch_steps"] = module.gate_steps
    return out


def auc_parity(seeds: list[int], epochs: int, rows: int, data_dir: str) -> dict[str, Any]:
    """Base model, sparse_adam vs dense_adam, on the planted synthetic dataset: val/test AUC per seed."""
    from ihas_lightning.config import compose
    from ihas_lightning.stages.search import run

    per: dict[str, list[dict[str, float]]] = {"sparse_adam": [], "dense_adam": []}
    for seed in seeds:
        for opt in per:
            with tempfile.TemporaryDirectory() as out:
                cfg = compose(
                    [
                        "method=base",
                        "logger=none",
                        f"seed={seed}",
                        f"search.max_epochs={epochs}",
                        "search.patience=null",
                        "model.batch_size=2048",
                        f"model.embedding_optimizer={opt}",
                        f"dataset.rows={rows}",
                        f"paths.data_dir={data_dir}",
                        "trainer.enable_progress_bar=false",
                        "prepare.progress=false",
                    ],  # fmt: skip
                    output_dir=out,
                )
                m = run(cfg)
            per[opt].append({"seed": seed, "val_auc": m["val/auc"], "test_auc": m["test/auc"],
                             "samples_per_s": m["samples_per_s"]})  # fmt: skip
    mean = {k: float(np.mean([r["val_auc"] for r in v])) for k, v in per.items()}
    diffs = [a["val_auc"] - b["val_auc"] for a, b in zip(per["sparse_adam"], per["dense_adam"])]
    return {
        "dataset": f"synthetic rows={rows}",
        "epochs": epochs,
        "seeds": seeds,
        "runs": per,
        "mean_val_auc": mean,
        "mean_val_auc_diff_sparse_minus_dense": float(np.mean(diffs)),
        "within_0.001": bool(abs(float(np.mean(diffs))) <= 0.001),
    }


# the textbook loop for the same model as each setup
REFERENCE = {"lightning_search": "textbook_search", "textbook_search": "textbook_search",
             "lightning_search_logit_draw": "textbook_search", "search_parts": "textbook_search"}  # fmt: skip


def search_parts_markdown(t: dict[str, Any]) -> list[str]:
    """The search batch itemised (``search_parts``), and the draw's before/after through Lightning."""
    sp = t.get("search_parts")
    if not sp:
        return []
    ms = sp["ms_per_batch"]
    lines = [
        "",
        f"The search phase's batch itemised (`search_parts`: its model step op by op in a plain loop, the gate "
        f"step every {sp['search_every']} batches amortised; the round with the fewest ms; the threshold "
        "searcher runs only in validation and the cluster stage):",
        "",
        "| part | ms per batch | share |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {ms[k]:.2f} | {ms[k] / sp['total_ms']:.0%} |" for k in SEARCH_PARTS]
    lines += [f"| total | {sp['total_ms']:.2f} | 100% |", "",
              f"The draw before (`z + logit(u) > 0` on every entry): {ms['draw_logit']:.2f} ms; after (`u < p` "
              f"where the gate is frozen): {ms['draw']:.2f} ms."]  # fmt: skip
    before, after = t.get("lightning_search_logit_draw"), t.get("lightning_search")
    if before and after:
        lines.append(
            f"Through Lightning, side by side in this run: lightning_search {before['samples_per_s']:,.0f} samples/s "
            f"before, {after['samples_per_s']:,.0f} after ({after['samples_per_s'] / before['samples_per_s'] - 1:+.0%})."
        )
    return lines


def to_markdown(res: dict[str, Any]) -> str:
    t = res["throughput"]
    base = t["textbook_dense_adam"]["samples_per_s"]
    lines = [
        "# bench_train: training throughput and AUC parity",
        "",
        f"Machine: {res['machine']['cpus']} CPUs, torch {res['machine']['torch']}, "
        f"{res['machine']['threads']} threads. Vocabulary: {t['config']['fields']} fields, "
        f"{t['config']['total_ids']:,} ids x 16 dims, batch {t['config']['batch']}.",
        "",
        f"Samples/s: fastest of {t['config']['rounds']} interleaved rounds (median in brackets); "
        "the machine is shared, see load_average_at_end in the JSON.",
        "",
        "The search stage's reference is the textbook loop for the same gated model (textbook_search).",
        "",
        "| setup | samples/s | x textbook (base model) | x textbook (same model) | x lightning_base |",
        "|---|---:|---:|---:|---:|",
    ]
    lb = t.get("lightning_base", {}).get("samples_per_s")
    for k, v in t.items():
        if k == "config":
            continue
        same = t.get(REFERENCE.get(k, "textbook_dense_adam"), {}).get("samples_per_s", base)
        same_s = (
            f"{v['samples_per_s'] / same:.1f}x"
            if k in REFERENCE or not k.startswith("lightning_") or k == "lightning_base"
            else "-"
        )
        lb_s = f"{v['samples_per_s'] / lb:.2f}x" if lb and k.startswith("lightning_") else "-"
        lines.append(
            f"| {k} | {v['samples_per_s']:,.0f} ({v['median_samples_per_s']:,.0f}) | "
            f"{v['samples_per_s'] / base:.1f}x | {same_s} | {lb_s} |"
        )
    lines += search_parts_markdown(t)
    p = res.get("auc_parity")
    if p:
        lines += [
            "",
            f"AUC parity (Base model, {p['dataset']}, {p['epochs']} epochs, seeds {p['seeds']}):",
            "",
            "| embedding optimizer | mean val AUC |",
            "|---|---:|",
        ]
        lines += [f"| {k} | {v:.4f} |" for k, v in p["mean_val_auc"].items()]
        lines += [
            "",
            f"Mean difference (sparse - dense): {p['mean_val_auc_diff_sparse_minus_dense']:+.5f} "
            f"(within 0.001: {p['within_0.001']}).",
        ]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total-ids", type=int, default=1_000_000)
    ap.add_argument("--batches", type=int, default=25, help="batches per round for the dense-Adam loops")
    ap.add_argument("--lightning-batches", type=int, default=150, help="batches per round, sparse runs")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--parity-epochs", type=int, default=8)
    ap.add_argument("--parity-rows", type=int, default=200_000)
    ap.add_argument("--data-dir", default=os.environ.get("IHAS_DATA_DIR", "data"))
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument(
        "--methods",
        nargs="*",
        default=["adafs_soft", "adafs_hard", "autofield", "optfs"],
        help="baselines timed side by side with lightning_base (their search phase)",
    )
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from ihas_lightning.allocator import tune

    tune()  # as the CLI does (trainer.malloc_tuning=true); the textbook loops run under it too

    if args.threads:
        torch.set_num_threads(args.threads)
    vocab = criteo_like_vocab(args.total_ids)
    batch = MODEL["batch_size"]
    t0 = time.perf_counter()
    data = make_batches(vocab, max(args.batches, args.lightning_batches), batch)
    plain, lbatches = data[: args.batches], data[: args.lightning_batches]
    setups = {
        "textbook_dense_adam": lambda: plain_loop(vocab, plain, "textbook", args.warmup),
        "textbook_search": lambda: plain_loop(vocab, plain, "textbook_search", args.warmup),
        "fused_dense_adam": lambda: plain_loop(vocab, plain, "fused", args.warmup),
        "plain_sparse_adam": lambda: plain_loop(vocab, lbatches, "sparse", args.warmup),
        "lightning_base": lambda: lightning_run(vocab, lbatches, "base", args.warmup),
        "lightning_search": lambda: lightning_run(vocab, lbatches, "search", args.warmup),
        "lightning_search_logit_draw": lambda: lightning_run(
            vocab, lbatches, "search", args.warmup, draw="logit"
        ),
        "search_parts": lambda: search_parts(vocab, lbatches, args.warmup),
    }
    for m in args.methods:
        setups[f"lightning_{m}"] = lambda m=m: lightning_run(vocab, lbatches, m, args.warmup)
    # the setups are interleaved over rounds and each keeps its fastest round, so a burst of load
    # from other processes on a shared machine does not bias one setup against another
    rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in setups}
    for r in range(args.rounds):
        for name, fn in setups.items():
            rounds[name].append(fn())
            print(f"round {r} {name}: {rounds[name][-1]['samples_per_s']:,.0f} samples/s", flush=True)
    thr: dict[str, Any] = {"config": {"fields": len(vocab), "total_ids": sum(vocab), "batch": batch,
                                      "rounds": args.rounds, "statistic": "fastest round"}}  # fmt: skip
    for name, rs in rounds.items():
        sps = [x["samples_per_s"] for x in rs]
        thr[name] = {**rs[int(np.argmax(sps))], "samples_per_s": max(sps), "median_samples_per_s": float(np.median(sps)),
                     "rounds_samples_per_s": sps}  # fmt: skip
    base = thr["textbook_dense_adam"]["samples_per_s"]
    for k, v in thr.items():
        if k != "config":
            v["speedup_vs_textbook"] = v["samples_per_s"] / base
            v["speedup_vs_textbook_same_model"] = (
                v["samples_per_s"] / thr[REFERENCE.get(k, "textbook_dense_adam")]["samples_per_s"]
            )
    res: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "throughput": thr,
    }
    if not args.skip_parity:
        res["auc_parity"] = auc_parity(
            list(range(args.seeds)), args.parity_epochs, args.parity_rows, args.data_dir
        )
        print("parity", json.dumps(res["auc_parity"]["mean_val_auc"]), flush=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from ihas_lightning.utils import write_json

    write_json(out / "bench_train.json", res)
    (out / "bench_train.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return res


if __name__ == "__main__":
    main()
