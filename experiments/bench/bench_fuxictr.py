"""``make bench-fuxictr``: our Base training step against FuxiCTR's, side by side in one process (issue 15).

FuxiCTR (2.3.10, the ``compare`` extra the make target installs) is timed through its own code: ``fuxictr.pytorch.models.BaseModel`` with ``FeatureEmbedding`` and ``MLP_Block`` composed as its
model zoo's ``DNN`` composes them (the zoo is not part of the package), compiled with its Adam and
binary cross-entropy, and trained with its ``train_step`` (zero_grad, forward, loss + its embedding
regularizer, backward, gradient-norm clipping at its ``fit`` default 10, step) plus the ``loss.item()``
its ``train_epoch`` does per batch. The model is ours: 39 fields x 16 dims, MLP (16, 8), lr 1e-3,
embedding L2 1e-6 (the paper's weight decay, as FuxiCTR's ``embedding_regularizer``).

Ours: Base (``CTRModule``) through ``lightning.Trainer`` with the CLI's trainer callbacks
(``bench_load.lightning_fit``, ``trainer.threads=auto``, malloc tuning on as in the CLI).

Both train on the same pre-built batches (FuxiCTR's as its dict of per-field tensors), 55k and 1M ids,
quiet and with one core kept busy (a spinning process this benchmark starts and stops), FuxiCTR at 1
thread and at the usable cores (the faster is its reference), interleaved for ``--rounds`` rounds
(fastest round). Writes ``experiments/results/bench_fuxictr.{json,md}``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from collections import OrderedDict
from typing import Any

import torch

from . import save_results
from .bench_load import Load, lightning_fit
from .bench_train import RESULTS, criteo_like_vocab, make_batches


def fuxictr_dnn(vocab: list[int], workdir: str):
    """FuxiCTR's DNN over our fields: its FeatureMap, FeatureEmbedding, MLP_Block and BaseModel."""
    from fuxictr.features import FeatureMap
    from fuxictr.pytorch.layers import FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel

    fmap = FeatureMap("bench", workdir)
    fmap.features = OrderedDict(
        (f"f{i}", {"type": "categorical", "vocab_size": int(v), "source": ""}) for i, v in enumerate(vocab)
    )
    fmap.labels = ["label"]
    fmap.default_emb_dim = 16
    fmap.num_fields = fmap.get_num_fields()

    class DNN(BaseModel):  # the model zoo's DNN (embedding -> MLP -> sigmoid), with our sizes
        def __init__(self, feature_map):
            super().__init__(
                feature_map, model_id="DNN", gpu=-1, embedding_regularizer=1e-6, net_regularizer=0,
                verbose=0, model_root=workdir, metrics=["AUC", "logloss"],
            )  # fmt: skip
            self.embedding_layer = FeatureEmbedding(feature_map, 16)
            self.mlp = MLP_Block(
                input_dim=feature_map.sum_emb_out_dim(), output_dim=1, hidden_units=[16, 8],
                hidden_activations="ReLU", output_activation=self.output_activation,
                dropout_rates=0.0, batch_norm=False,
            )  # fmt: skip
            self.compile("adam", "binary_crossentropy", 1e-3)
            self.reset_parameters()
            self.model_to_device()
            self._max_gradient_norm = 10.0  # BaseModel.fit's default

        def forward(self, inputs):
            x = self.get_inputs(inputs)
            return {"y_pred": self.mlp(self.embedding_layer(x, flatten_emb=True))}

    return DNN(fmap)


def fuxictr_fit(vocab: list[int], batches, threads: int, warmup: int, workdir: str) -> float:
    """Samples/s of FuxiCTR's train_step over ``batches`` (dicts), warm-up batches untimed."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = fuxictr_dnn(vocab, workdir)
    model.train()
    secs, samples = 0.0, 0
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        loss = model.train_step(b)
        loss.item()
        if i >= warmup:
            secs += time.perf_counter() - t0
            samples += int(b["label"].shape[0])
    return samples / secs


def as_dicts(batches, fields: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for x, y in batches:
        d = {f"f{i}": x[:, i].long() for i in range(fields)}
        d["label"] = y
        out.append(d)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=200, help="training batches per fit (batch 2048)")
    ap.add_argument("--fuxictr-batches", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--vocabs", type=int, nargs="*", default=[55_000, 1_000_000])
    ap.add_argument("--out", default=str(RESULTS / "bench_fuxictr"))
    args = ap.parse_args(argv)
    try:
        import fuxictr
    except ImportError:
        raise SystemExit("bench_fuxictr: FuxiCTR is not installed (make bench-fuxictr installs it)") from None
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "ihas_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from ihas_lightning.allocator import tune
    from ihas_lightning.threads import usable_cores

    tune()  # as the CLI does
    cores = usable_cores()
    t0 = time.perf_counter()
    res: dict[str, Any] = {"cores": cores, "torch": torch.__version__, "fuxictr": fuxictr.__version__,
                           "batch": 2048, "rounds": args.rounds, "cells": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        for total in args.vocabs:
            vocab = criteo_like_vocab(total)
            data = make_batches(vocab, max(args.batches, args.fuxictr_batches), 2048)
            fdata = as_dicts(data[: args.fuxictr_batches], len(vocab))
            for loaded in (False, True):
                key = f"{sum(vocab)}_ids/{'one core busy' if loaded else 'quiet'}"
                best: dict[str, float] = {}
                with Load(loaded):
                    for _ in range(args.rounds):
                        best["ours base (auto)"] = max(
                            best.get("ours base (auto)", 0.0),
                            lightning_fit(vocab, data[: args.batches], "base", "auto", cores, args.warmup),
                        )
                        for th in sorted({1, cores}):
                            sps = fuxictr_fit(vocab, fdata, th, 3, work)
                            best[f"fuxictr ({th} thread)"] = max(best.get(f"fuxictr ({th} thread)", 0.0), sps)
                        print(key, {k: round(v) for k, v in best.items()}, flush=True)
                torch.set_num_threads(cores)
                fx = max(v for k, v in best.items() if k.startswith("fuxictr"))
                res["cells"][key] = {**{k: round(v) for k, v in best.items()},
                                     "ours / fuxictr (faster)": round(best["ours base (auto)"] / fx, 2)}  # fmt: skip
    res["seconds"] = round(time.perf_counter() - t0, 1)
    save_results(args.out, res, markdown(res))
    return res


def markdown(r: dict[str, Any]) -> str:
    keys = list(next(iter(r["cells"].values())))
    md = [f"# Base training step: ours vs FuxiCTR {r['fuxictr']} ({r['cores']} usable cores, torch {r['torch']})", "",
          f"Samples/s, batch {r['batch']}, the same batches, fastest of {r['rounds']} interleaved rounds. Ours: Base "
          "through `lightning.Trainer` with the CLI's callbacks (`trainer.threads=auto`). FuxiCTR: its `BaseModel` "
          "`train_step` on its model zoo's DNN composition (dense Adam, embedding regularizer, gradient clipping).", "",
          "| vocabulary / load | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]  # fmt: skip
    for key, c in r["cells"].items():
        md.append(f"| {key} | " + " | ".join(f"{c[k]:,}" for k in keys) + " |")
    md += ["", f"{r['seconds']:.0f} s.", ""]
    return "\n".join(md)


if __name__ == "__main__":
    main()
