"""``stage=search``: the iHAS searching stage (paper Algorithm 1), or the Base model with ``method=base``.

``run(cfg)`` wires: prepared data (``ensure_prepared``) -> ``IHASDataModule`` -> ``SearchModule``
(``method=ihas``) or ``CTRModule`` (``method=base``, same code path without gates) -> a Trainer
built from ``cfg.trainer`` -> fit -> validate/test the best checkpoint -> outputs.

Budgets (:mod:`ihas_lightning.schedule`, :mod:`ihas_lightning.training`): the batch size and the
gate schedule follow the data size (``model.batch_size=auto``, ``search.search_every=auto``); the
output bias starts at the training rows' log-odds (``model.output_bias=prior``). Base trains up to
``search.max_epochs``, early-stopped on ``search.monitor`` (``val/logloss``) with
``search.patience``. A search pretrains with open gates until ``search.pretrain.patience`` epochs
bring no improvement (at most ``search.pretrain.max_epochs``), restores the best pretrained weights,
then runs the bi-level search for at most ``search.max_epochs`` epochs, early-stopped alike; the
model's lr is scaled by ``search.model_lr_scale`` in that phase.

The gate's data (``search.gate_data``): ``holdout`` (default) holds a seeded
``search.holdout_fraction`` of the TRAIN rows out of the model's training and feeds them to the gate
steps, so the validation split used for early stopping and checkpoint selection is never fitted by
the gate (on a sample the gate, N*d x N*d weights, memorises a small validation split: val AUC 0.9999,
test AUC 0.67 on the Criteo sample); ``val`` is the paper's protocol (``experiment=paper_protocol``).

Outputs in ``<run dir>/search/``::

    best.ckpt      the best model by search.monitor (deterministic masks), search-phase epochs only
    last.ckpt      the last epoch (for ``search.resume=<ckpt>``)
    metrics.json   val + test AUC/logloss of best.ckpt, the resolved budget (batch size, gate
                   schedule, epochs), open-dim shares (overall / per field / per dim) and
                   polarization statistics on the test split, timing and samples/s, warnings
                   (too few gate steps, nothing or everything closed, no bimodal histogram) and
                   (synthetic data) per-group field recovery against truth.json
    gate_hist.png  histogram of the gate probabilities on the test split (paper Figure 3)
    manifest.json  written last: config hashes, the prepared dir and its feature-map hash

Model selection (ModelCheckpoint and EarlyStopping on ``search.monitor``) ignores the pretraining epochs,
whose validation runs with open gates: otherwise the best checkpoint could be a pretrain-only
model whose gates were never trained. If no phase-2 validation ran (``fast_dev_run``, or a budget
that ends inside pretraining) ``best.ckpt`` holds the final weights.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError, DataError
from ..utils import seed_everything, stable_hash, write_json

log = logging.getLogger("ihas_lightning")

SEARCH_DIR = "search"
BEST = "best.ckpt"
LAST = "last.ckpt"
MANIFEST_KEYS = ["seed", "dataset", "model", "method", "search", "trainer"]


def check_gate_cfg(gate: DictConfig) -> None:
    """One-line ConfigError naming the ``method.gate.<key>`` whose value is out of range."""
    from ..models.gate import INPUT_NORMS

    def num(key: str, default: float | None) -> float | None:
        v = gate.get(key, default)
        if v is None:
            return None
        try:
            return float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"config key 'method.gate.{key}': must be a number (got {v!r})") from None

    rules = [
        ("tau", 0.1, lambda v: v > 0, "must be > 0"),
        ("lambda_reg", 1e-4, lambda v: v >= 0, "must be >= 0"),
        ("bins", 20, lambda v: v >= 3 and v == int(v), "must be an integer >= 3"),
        ("lr", 1e-3, lambda v: v > 0, "must be > 0"),
        ("weight_decay", None, lambda v: v >= 0, "must be >= 0 (or null: model.weight_decay)"),
        ("init_bias", 3.0, lambda v: v == v, "must be a number"),
    ]
    for key, default, ok, rule in rules:
        v = num(key, default)
        if v is not None and not ok(v):
            raise ConfigError(f"config key 'method.gate.{key}': {rule} (got {gate.get(key)})")
    norm = gate.get("input_norm", "none")
    if norm not in INPUT_NORMS:
        raise ConfigError(
            f"config key 'method.gate.input_norm': must be one of {list(INPUT_NORMS)} (got {norm!r})"
        )


# ---- module construction / loading -------------------------------------------------------------------
def build_module(cfg: DictConfig, feature_map, output_bias: float | None = None, search_every: int = 100):
    """``SearchModule`` for a gated method (ihas), ``CTRModule`` for ``method=base``."""
    from ..modules.ctr import CTRModule
    from ..modules.search import SearchModule

    model = OmegaConf.to_container(cfg.model, resolve=True)
    gated = bool(cfg.method.get("gated", False))
    if not gated:
        return CTRModule(
            feature_map.vocab_sizes,
            model,
            eval_mode="open",
            field_names=feature_map.field_names,
            output_bias=output_bias,
        )
    gate = OmegaConf.to_container(cfg.method.gate, resolve=True)
    pre = cfg.search.pretrain
    return SearchModule(
        feature_map.vocab_sizes,
        model,
        gate=gate,
        # patience null (or no pretraining): exactly pretrain.max_epochs epochs; else the
        # SearchSchedule callback ends the pretraining on its validation criterion
        pretrain_epochs=int(pre.max_epochs) if pre.get("patience") is None or pre.max_epochs == 0 else None,
        search_every=int(search_every),
        field_names=feature_map.field_names,
        output_bias=output_bias,
        model_lr_scale=float(cfg.search.model_lr_scale),
    )


def load_search_model(ckpt_path: str | Path, feature_map=None):
    """Load a search-stage checkpoint (SearchModule; CTRModule for a ``method=base`` run), in eval mode.

    Raises a one-line DataError when the file is missing/unreadable or (given ``feature_map``) its
    field count or vocab sizes do not fit the prepared dataset."""
    from ..modules.ctr import CTRModule
    from ..modules.search import SearchModule

    path = Path(ckpt_path)
    if not path.is_file():
        raise DataError(f"{path}: search checkpoint not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        hp = ck["hyper_parameters"]
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is a data error
        raise DataError(f"{path}: not a readable search checkpoint ({type(e).__name__}: {e})") from e
    vocab = [int(v) for v in hp["vocab_sizes"]]
    if feature_map is not None:
        fm_vocab = list(feature_map.vocab_sizes)
        if len(vocab) != len(fm_vocab):
            raise DataError(
                f"{path}: the checkpoint has {len(vocab)} fields but the prepared dataset has {len(fm_vocab)}"
            )
        if vocab != fm_vocab:
            bad = next(i for i, (a, b) in enumerate(zip(vocab, fm_vocab)) if a != b)
            raise DataError(
                f"{path}: vocab size of field {feature_map.field_names[bad]!r} is {vocab[bad]} in the "
                f"checkpoint but {fm_vocab[bad]} in the prepared dataset"
            )
    cls = SearchModule if "search_every" in hp else CTRModule
    module = cls(**hp)
    module.load_state_dict(ck["state_dict"])
    module.eval()
    return module


# ---- outputs --------------------------------------------------------------------------------------------
def _group_batches(dm, split: str, batches: list[int]):
    """Per-batch slices of the ``_group`` column aligned with an ordered pass over ``split``."""
    groups = np.array(dm.extra_column(split, "_group"))
    start = 0
    for n in batches:
        yield torch.as_tensor(groups[start : start + n])
        start += n


def _test_gate_statistics(module, dm, synthetic: bool) -> dict[str, Any]:
    batches = [
        (torch.as_tensor(b[0]), torch.as_tensor(b[1])) for b in dm.split_dataloader("test", shuffle=False)
    ]
    groups = _group_batches(dm, "test", [len(b[1]) for b in batches]) if synthetic else None
    return module.gate_statistics(batches, groups)


def _metric(d: list[dict], key: str) -> float | None:
    for m in d:
        if key in m:
            return float(m[key])
    return None


GATE_DATA = ("holdout", "val")
OUTPUT_BIAS = ("prior", "zero")


def check_cfg(cfg: DictConfig) -> None:
    """Every key the search stage (and the Base fit) will use, checked before any work."""
    from .. import schedule
    from ..training import MONITORS, check_fit_cfg, check_monitor, trainer_kwargs

    sc = cfg.search
    check_fit_cfg(sc, "search")
    schedule.check_batch_size(cfg.model)
    ob = cfg.model.get("output_bias", "prior")
    if ob not in OUTPUT_BIAS:
        raise ConfigError(f"config key 'model.output_bias': must be one of {list(OUTPUT_BIAS)} (got {ob!r})")
    trainer_kwargs(cfg)
    if not bool(cfg.method.get("gated", False)):
        return
    check_fit_cfg(sc.pretrain, "search.pretrain", min_epochs=0)  # 0: no pretraining
    check_monitor(sc.get("search_monitor"), "search.search_monitor", MONITORS)
    schedule.check_search_every(sc)
    if sc.gate_data not in GATE_DATA:
        raise ConfigError(
            f"config key 'search.gate_data': must be one of {list(GATE_DATA)} (got {sc.gate_data!r})"
        )
    frac = sc.get("holdout_fraction")
    if not isinstance(frac, (int, float)) or not 0.0 < float(frac) < 1.0:
        raise ConfigError(f"config key 'search.holdout_fraction': must be in (0, 1) (got {frac!r})")
    scale = sc.get("model_lr_scale")
    if not isinstance(scale, (int, float)) or float(scale) <= 0:
        raise ConfigError(f"config key 'search.model_lr_scale': must be > 0 (got {scale!r})")
    mg = sc.get("min_gate_steps")
    if not isinstance(mg, int) or mg < 0:
        raise ConfigError(f"config key 'search.min_gate_steps': must be an integer >= 0 (got {mg!r})")
    sbs = sc.get("search_batch_size")
    if sbs is not None and (not isinstance(sbs, int) or sbs < 1):
        raise ConfigError(f"config key 'search.search_batch_size': must be >= 1 or null (got {sbs!r})")
    check_gate_cfg(cfg.method.gate)


def holdout_mask(rows: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded bool mask over the train rows (file order): the gate's held-out rows."""
    mask = np.random.default_rng([int(seed), 0x6A7E]).random(rows) < float(fraction)
    if rows >= 2 and not mask.any():
        mask[0] = True
    if rows >= 2 and mask.all():
        mask[0] = False
    return mask


def search_warnings(metrics: dict[str, Any], min_gate_steps: int) -> list[str]:
    """One-line warnings for a search that did not select (also written to metrics.json)."""
    out = []
    steps = metrics.get("gate_steps", 0)
    if steps < min_gate_steps:
        out.append(
            f"the gate made only {steps} steps (< search.min_gate_steps={min_gate_steps}): too few to learn "
            f"a selection; lower search.search_every or raise search.max_epochs"
        )
    share = metrics.get("open_share")
    if share is not None and share >= 0.99:
        out.append(f"the search closed nothing: {share:.1%} of the dims are open on the test split")
    elif share is not None and share <= 0.01:
        out.append(f"the search closed everything: {share:.1%} of the dims are open on the test split")
    valley = (metrics.get("gate") or {}).get("polarization", {}).get("share_valley_found")
    if valley is not None and valley < 0.5:
        out.append(
            f"the gate histogram is not bimodal for {1 - valley:.0%} of the test samples (no valley: their "
            f"threshold fell back to 0.5)"
        )
    return out


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train the search (or Base) model and write ``search/`` outputs; returns the metrics dict."""
    from .. import schedule
    from ..data.datamodule import IHASDataModule
    from ..data.feature_map import FeatureMap
    from ..loggers import build_logger, finish_loggers
    from ..modules.search import SearchModule, SearchSchedule
    from ..report.figures import gate_histogram_png
    from ..training import build_trainer, selection_callbacks, throughput_callback
    from .prepare import ensure_prepared

    check_cfg(cfg)
    sc = cfg.search
    gated = bool(cfg.method.get("gated", False))
    resume = sc.get("resume")
    if resume and not Path(str(resume)).is_file():
        raise DataError(f"{resume}: checkpoint to resume from not found (search.resume)")

    out_root = Path(str(cfg.paths.output_dir))
    out = out_root / SEARCH_DIR
    out.mkdir(parents=True, exist_ok=True)
    # the manifest marks a complete search dir: drop a previous run's before writing anything new
    for stale in ("manifest.json", "metrics.json"):
        (out / stale).unlink(missing_ok=True)

    prepared = Path(ensure_prepared(cfg))
    seed_everything(int(cfg.seed))
    fmap = FeatureMap.load(prepared)
    n_train = fmap.rows("train")
    hold = None
    if gated and sc.gate_data == "holdout":
        hold = holdout_mask(n_train, float(sc.holdout_fraction), int(cfg.seed))
    model_rows = n_train - (int(hold.sum()) if hold is not None else 0)
    bs = schedule.batch_size(cfg.model, model_rows)
    sbs = int(sc.get("search_batch_size") or bs)
    eval_bs = int(cfg.evaluate.get("batch_size") or bs)
    dm = IHASDataModule(
        str(prepared),
        batch_size=bs,
        eval_batch_size=eval_bs,
        seed=int(cfg.seed),
        search_batch_size=sbs,
        row_filter={"train": ~hold} if hold is not None else None,
    )
    every = schedule.search_every(sc, schedule.batches_per_epoch(model_rows, bs)) if gated else None
    prior = dm.positive_rate("train")
    bias = schedule.prior_logit(prior) if cfg.model.get("output_bias", "prior") == "prior" else None
    synthetic = (prepared / "truth.json").is_file()
    module = build_module(cfg, fmap, output_bias=bias, search_every=every or 100)
    budget = {
        "batch_size": bs,
        "train_rows": model_rows,
        "batches_per_epoch": schedule.batches_per_epoch(model_rows, bs),
    }
    if isinstance(module, SearchModule):
        if hold is not None:
            gate_dm = IHASDataModule(
                str(prepared),
                batch_size=sbs,
                seed=int(cfg.seed),
                search_batch_size=sbs,
                row_filter={"train": hold},
            )
            module.set_search_loader(gate_dm.search_dataloader("train"))
            budget["gate_rows"] = int(hold.sum())
        else:
            module.set_search_loader(dm.search_dataloader("val"))
            budget["gate_rows"] = fmap.rows("val")
        budget.update(search_every=every, gate_data=str(sc.gate_data), search_batch_size=sbs)
    log.info(
        "%s: %s", "search" if gated else "base",
        ", ".join(f"{k}={v}" for k, v in budget.items()),
    )  # fmt: skip

    # Base and the pretraining: search.monitor; the bi-level search phase: search.search_monitor
    monitor = str(sc.search_monitor) if gated else str(sc.monitor)
    logger = build_logger(cfg, str(cfg.get("tag") or "search"))
    try:
        callbacks, ckpt_cb = selection_callbacks(out, monitor, sc.get("patience"))
        throughput = throughput_callback()
        callbacks.append(throughput)
        if gated:
            pre = sc.pretrain
            callbacks.insert(
                0,
                SearchSchedule(
                    pretrain_max_epochs=int(pre.max_epochs),
                    pretrain_patience=pre.get("patience"),
                    search_max_epochs=int(sc.max_epochs),
                    monitor=str(sc.monitor),
                    restore_best=bool(pre.get("restore_best", True)),
                ),
            )
            max_epochs = int(pre.max_epochs) + int(sc.max_epochs)
        else:
            max_epochs = int(sc.max_epochs)
        trainer = build_trainer(cfg, max_epochs, callbacks, logger, out_root)
        t0 = time.perf_counter()
        trainer.fit(
            module,
            train_dataloaders=dm.train_dataloader(),
            val_dataloaders=dm.val_dataloader(),
            ckpt_path=str(resume) if resume else None,
        )
        fit_seconds = time.perf_counter() - t0
        gate_steps = int(getattr(module, "gate_steps", 0))  # loading best.ckpt below restores its count
        best = Path(ckpt_cb.best_model_path) if ckpt_cb.best_model_path else None
        if best is None or not best.is_file():
            best = out / BEST  # no selectable validation ran: the final weights are the result
            trainer.save_checkpoint(best)
        if not (out / LAST).is_file():
            trainer.save_checkpoint(out / LAST)

        val = trainer.validate(module, dataloaders=dm.val_dataloader(), ckpt_path=str(best), verbose=False)
        test = trainer.test(module, dataloaders=dm.test_dataloader(), ckpt_path=str(best), verbose=False)
        start = getattr(module, "search_start_epoch", None)
        metrics: dict[str, Any] = {
            "method": str(cfg.method.name),
            "dataset": str(cfg.dataset.name),
            "val/auc": _metric(val, "val/auc"),
            "val/logloss": _metric(val, "val/logloss"),
            "test/auc": _metric(test, "test/auc"),
            "test/logloss": _metric(test, "test/logloss"),
            "monitor": monitor,
            "best_epoch": _best_epoch(best),
            "epochs_run": int(trainer.current_epoch),
            "pretrain_epochs": start if gated else 0,
            "budget": {**budget, "max_epochs": max_epochs, "train_positive_rate": prior, "output_bias": bias},
            "global_step": int(trainer.global_step),
            "global_step_note": "counts optimizer steps: 2 per training batch, 3 on gate-step batches",
            "fit_seconds": round(fit_seconds, 3),
            "train_seconds": round(throughput.seconds, 3),
            "train_samples": throughput.samples,
            "samples_per_s": round(throughput.samples / throughput.seconds, 1)
            if throughput.seconds
            else None,
            "num_parameters": int(module.model.num_parameters()),
            "best_ckpt": str(best),
        }
        if isinstance(module, SearchModule):
            metrics["gate_steps"] = gate_steps
            metrics["gate_steps_at_best"] = int(module.gate_steps)
            stats = _test_gate_statistics(module, dm, synthetic)
            hist = stats.pop("p_hist")
            metrics["gate"] = {
                k: v for k, v in stats.items() if k not in ("per_group_field_mask", "group_samples")
            }
            metrics["gate"]["p_hist"] = hist
            metrics["open_share"] = stats["open_share"]
            metrics["open_share_per_field"] = stats["open_share_per_field"]
            title = (
                f"gate probabilities, test split ({cfg.method.name}, lambda={cfg.method.gate.lambda_reg}, "
                f"polarization={'on' if cfg.method.gate.polarization else 'off'})"
            )
            gate_histogram_png(
                hist, out / "gate_hist.png", title=title, threshold=stats["polarization"]["mean_threshold"]
            )
            if synthetic and "per_group_field_mask" in stats:
                from ..report.recovery import field_recovery
                from ..utils import read_json

                truth = read_json(prepared / "truth.json")
                metrics["per_group_field_mask"] = stats["per_group_field_mask"]
                metrics["recovery"] = field_recovery(stats["per_group_field_mask"], truth)
            metrics["warnings"] = search_warnings(metrics, int(sc.min_gate_steps))
            for w in metrics["warnings"]:
                log.warning("search: %s", w)
        write_json(out / "metrics.json", metrics)
        _write_manifest(cfg, out, prepared, fmap, best)
        log.info(
            "%s done: best epoch %s of %s, val/auc=%s test/auc=%s (%s)",
            "search" if gated else "base",
            metrics["best_epoch"],
            metrics["epochs_run"] + 1,
            _round(metrics["val/auc"]),
            _round(metrics["test/auc"]),
            out / "metrics.json",
        )
        return metrics
    finally:
        finish_loggers()


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def _best_epoch(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False).get("epoch"))
    except Exception:  # noqa: BLE001
        return None


def _write_manifest(cfg: DictConfig, out: Path, prepared: Path, fmap, best: Path) -> None:
    from ..artifacts import make_manifest, write_manifest

    manifest = make_manifest(
        "search",
        cfg,
        MANIFEST_KEYS,
        parents={"prepared_dir": prepared},
        extra={
            "resolved_config_hash": stable_hash(OmegaConf.to_container(cfg, resolve=True)),
            "prepared_dir": str(prepared.resolve()),
            "feature_map_hash": fmap.config_hash,
            "method": str(cfg.method.name),
            "best_ckpt": str(best.resolve()),
            "files": sorted(p.name for p in out.iterdir() if p.is_file()),
        },
    )
    write_manifest(out, manifest)
