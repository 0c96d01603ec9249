"""``stage=derive``: the final architecture of a field- or value-level method, from its search checkpoint.

The selector of the searched model says what survives (:meth:`Selector.derive`): AutoField the top-K
fields by their "select" logit, OptFS the feature values whose gate logit is > 0, PEP the embedding
entries of its budget's snapshot (``search/snapshots/budget_<b>.pt``) above their threshold. The result is
written in the shape the retrain stage reads (one architecture, trained on every row, no routing):

    derive/arch.json      fields kept (dims per field), kept rows per field, the scores the choice
                          was made on, and on synthetic data the choice against truth.json
    derive/row_keep.npy   [sum(vocab)] bool, field-major (value-level methods only)
    derive/entry_mask.npy [sum(vocab), d] bool (entry-level methods: PEP)
    derive/manifest.json  written last (the dir is built in a temporary sibling and renamed)

iHAS derives by per-sample thresholds + K-Means (``stage=cluster``); AdaFS derives nothing (its
controller ships at inference): for those, stage=derive is a one-line error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from .. import method
from ..artifacts import is_current, make_manifest, write_manifest
from ..data.feature_map import FeatureMap
from ..errors import ConfigError, DataError
from ..rundir import DERIVE_DIR, load_search_model, output_dir, prepared_dir, resolve_search_ckpt
from ..utils import atomic_dir, read_json, write_json

log = logging.getLogger("ihas_lightning")
CONFIG_KEYS = ["seed", "method"]
REQUIRED = ["arch.json"]


def check_cfg(cfg: DictConfig) -> None:
    method.check(cfg)


def truth_report(truth: dict[str, Any], field_names: list[str], field_keep: list[bool],
                 kept_share: list[float] | None) -> dict[str, Any]:  # fmt: skip
    """The derived choice against the planted truth: kept fields (precision / recall / F1 of the
    relevant fields: every group's, plus the key field that selects the group) and, for a value-level
    choice, the mean share of kept values on relevant vs noise fields."""
    relevant = {f for fs in truth["groups"].values() for f in fs} | {truth.get("key_field")}
    relevant.discard(None)
    kept = {n for n, k in zip(field_names, field_keep) if k}
    tp = len(kept & relevant)
    prec = tp / len(kept) if kept else 0.0
    rec = tp / len(relevant) if relevant else 0.0
    out: dict[str, Any] = {
        "relevant_fields": sorted(relevant),
        "kept_fields": sorted(kept),
        "precision": prec,
        "recall": rec,
        "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
    }
    if kept_share is not None:
        rel = [s for n, s in zip(field_names, kept_share) if n in relevant]
        noise = [s for n, s in zip(field_names, kept_share) if n not in relevant]
        out["kept_value_share_relevant"] = float(np.mean(rel)) if rel else None
        out["kept_value_share_noise"] = float(np.mean(noise)) if noise else None
        out["kept_value_share_per_field"] = dict(zip(field_names, [round(float(s), 4) for s in kept_share]))
    return out


def run(cfg: DictConfig, logger: Any = None) -> dict[str, Any]:
    check_cfg(cfg)
    out = output_dir(cfg) / DERIVE_DIR
    ckpt = resolve_search_ckpt(cfg)
    prepared = prepared_dir(cfg)
    fmap = FeatureMap.load(prepared)
    manifest = make_manifest("derive", cfg, CONFIG_KEYS, parents={"search_ckpt": ckpt})
    if is_current(out, manifest, REQUIRED):
        log.info("derive stage: %s is up to date (same config hash and inputs); reusing it", out)
        return _metrics(read_json(out / "arch.json"))
    module = load_search_model(ckpt, fmap)
    sel = module.model.selector
    if sel is None:
        raise DataError(f"{ckpt}: a Base checkpoint has no selector, so there is no architecture to derive")
    snaps = {q.stem: q for q in sorted((ckpt.parent / "snapshots").glob("*.pt"))}
    evaluate = _val_auc(cfg, prepared, module)
    try:
        with _progress(f"derive ({cfg.method.name})") as progress:
            arch = sel.derive(snapshots=snaps, evaluate=evaluate, table=module.model.embedding.tables[0].weight,
                              progress=progress)  # fmt: skip
    except ValueError as e:  # e.g. PEP never reached the budget to retrain
        raise DataError(f"{ckpt}: {e}") from None
    if arch is None:
        raise ConfigError(
            f"config key 'method.phases': {type(sel).__name__} derives no smaller architecture (it ships at "
            f"inference); run method={cfg.method.name} without derive/retrain"
        )
    n, d = sel.num_fields, sel.embed_dim
    names = list(fmap.field_names)
    field_keep = [bool(k) for k in (arch.field_keep if arch.field_keep is not None else [True] * n)]
    dims = [int(c) if k else 0 for c, k in zip(arch.field_dims or [d] * n, field_keep)]
    info: dict[str, Any] = {
        "method": str(cfg.method.name),
        "k": 1,
        "embed_dim": d,
        "vocab_sizes": list(fmap.vocab_sizes),
        "field_names": names,
        "field_dims": [dims],
        "kept_dims": [[list(range(c)) for c in dims]],
        "kept_fields": [nm for nm, k in zip(names, field_keep) if k],
        "scores": arch.scores,
        "prepared_dir": str(prepared.resolve()),
        "search_ckpt": str(ckpt.resolve()),
        "row_keep_file": None,
    }
    rk, em, kept_share = _masks(arch, info, fmap, ckpt, d)
    truth = prepared / "truth.json"
    if truth.is_file():
        info["truth"] = truth_report(read_json(truth), names, field_keep, kept_share)
    with atomic_dir(out, overwrite=True) as tmp:
        if arch.row_keep is not None:
            np.save(tmp / "row_keep.npy", rk)
        if em is not None:
            np.save(tmp / "entry_mask.npy", em)
        write_json(tmp / "arch.json", info)
        write_manifest(tmp, manifest)
    log.info(
        "derive stage (%s): keeps %d of %d fields%s -> %s", cfg.method.name, sum(field_keep), n,
        f", {info['kept_rows']:,} of {sum(fmap.vocab_sizes):,} feature values" if "kept_rows" in info else
        f", {info['kept_entries']:,} of {sum(fmap.vocab_sizes) * d:,} embedding entries" if "kept_entries" in info else "",
        out / "arch.json",
    )  # fmt: skip
    return _metrics(info)


def _masks(arch, info: dict[str, Any], fmap: FeatureMap, ckpt: Path, d: int):
    """The derived row mask (PEP / OptFS: kept feature values) or entry mask (kept embedding entries),
    checked against the vocabulary and summarised per field into ``info``: (rows, entries, kept share
    per field), None where the method derives none."""
    n, rk, em, kept_share = len(fmap.vocab_sizes), None, None, None
    bounds = np.cumsum([0, *fmap.vocab_sizes])
    if arch.row_keep is not None:
        rk = np.asarray(arch.row_keep.cpu().numpy(), dtype=bool)
        if rk.size != sum(fmap.vocab_sizes):
            raise DataError(f"{ckpt}: row mask of {rk.size} entries for {sum(fmap.vocab_sizes)} ids")
        per_field = [int(rk[bounds[f] : bounds[f + 1]].sum()) for f in range(n)]
        kept_share = [per_field[f] / fmap.vocab_sizes[f] for f in range(n)]
        info.update(row_keep_file="row_keep.npy", kept_rows_per_field=per_field,
                    kept_rows=int(rk.sum()), kept_rows_share=float(rk.mean()))  # fmt: skip
    if arch.entry_mask is not None:
        em = np.asarray(arch.entry_mask.cpu().numpy(), dtype=bool)
        if em.shape != (sum(fmap.vocab_sizes), d):
            raise DataError(
                f"{ckpt}: entry mask of shape {em.shape} for a {sum(fmap.vocab_sizes)} x {d} table"
            )
        per_field = [int(em[bounds[f] : bounds[f + 1]].sum()) for f in range(n)]
        kept_share = [per_field[f] / (fmap.vocab_sizes[f] * d) for f in range(n)]
        info.update(entry_mask_file="entry_mask.npy", kept_entries_per_field=per_field,
                    kept_entries=int(em.sum()), kept_entries_share=float(em.mean()))  # fmt: skip
    return rk, em, kept_share


def _metrics(info: dict[str, Any]) -> dict[str, Any]:
    m: dict[str, Any] = {"derive/kept_fields": len(info["kept_fields"])}
    if "kept_rows_share" in info:
        m["derive/kept_rows_share"] = info["kept_rows_share"]
    if "kept_entries_share" in info:
        m["derive/kept_entries_share"] = info["kept_entries_share"]
    if "truth" in info:
        m["derive/truth_f1"] = info["truth"]["f1"]
    return m


__all__ = ["run", "check_cfg", "truth_report"]


def _val_auc(cfg: DictConfig, prepared: Path, module: Any):
    """A scorer for derive steps that search on validation: the AUC of the search model (its selector's
    current state, deterministic mode) over the whole validation split, batches held in memory."""
    import torch
    from sklearn.metrics import roc_auc_score

    from ..rundir import make_datamodule, split_batches

    state: dict[str, Any] = {}

    def evaluate() -> float:
        if "batches" not in state:
            bs = int(cfg.evaluate.batch_size)
            xs, y = split_batches(make_datamodule(cfg, prepared, batch_size=bs), "val", bs)
            state["batches"], state["y"] = xs, y.numpy()
        model = module.model.eval()
        with torch.inference_mode():
            p = torch.cat([torch.sigmoid(model(x, "deterministic")) for x in state["batches"]]).numpy()
        return float(roc_auc_score(state["y"], p))

    return evaluate


class _progress:
    """A rich progress bar for derive steps that report (generation, best score)."""

    def __init__(self, title: str):
        self.title = title

    def __enter__(self):
        from rich.progress import Progress

        self.bar = Progress(transient=False)
        self.bar.start()
        self.task = self.bar.add_task(self.title, total=None)

        def report(step: int, best: float) -> None:
            self.bar.update(
                self.task, completed=step + 1, description=f"{self.title}: best val AUC {best:.4f}"
            )

        return report

    def __exit__(self, *exc):
        self.bar.stop()
        return False
