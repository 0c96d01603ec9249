"""``stage=search``: the iHAS searching stage (paper Algorithm 1), or the Base model with ``method=base``.

``run(cfg)`` wires: prepared data (``ensure_prepared``) -> ``IHASDataModule`` -> ``SearchModule``
(``method=ihas``) or ``CTRModule`` (``method=base``, same code path without gates) -> a Trainer
built from ``cfg.trainer`` -> fit -> validate/test the best checkpoint -> outputs.

Outputs in ``<run dir>/search/``::

    best.ckpt      the best model by val/auc (deterministic masks), phase-2 epochs only
    last.ckpt      the last epoch (for ``search.resume=<ckpt>``)
    metrics.json   val + test AUC/logloss of best.ckpt, open-dim shares (overall / per field / per
                   dim) and polarization statistics on the test split, timing and samples/s,
                   and (synthetic data) per-group field recovery against truth.json
    gate_hist.png  histogram of the gate probabilities on the test split (paper Figure 3)
    manifest.json  written last: config hashes, the prepared dir and its feature-map hash

Model selection (ModelCheckpoint and EarlyStopping on ``val/auc``) ignores the pretraining epochs,
whose validation runs with open gates: otherwise the best checkpoint could be a pretrain-only
model whose gates were never trained. If no phase-2 validation ran (``fast_dev_run``, or a budget
that ends inside pretraining) ``best.ckpt`` holds the final weights.
"""

from __future__ import annotations

import inspect
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


# ---- Trainer ---------------------------------------------------------------------------------------
def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.trainer`` as Trainer kwargs; an unknown key is a one-line ConfigError naming it."""
    import lightning as L

    tcfg = OmegaConf.to_container(cfg.get("trainer") or {}, resolve=True)
    assert isinstance(tcfg, dict)
    allowed = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    for key in tcfg:
        if key not in allowed:
            raise ConfigError(f"config key 'trainer.{key}': not a lightning.Trainer argument")
    return tcfg


def build_trainer(cfg: DictConfig, max_epochs: int, callbacks: list, logger: Any, **overrides: Any):
    """``L.Trainer(**cfg.trainer)`` with the stage's epoch budget, callbacks and logger."""
    import lightning as L

    kw = trainer_kwargs(cfg)
    kw.update(
        max_epochs=int(max_epochs),
        callbacks=callbacks,
        logger=logger if logger is not None else False,
        default_root_dir=str(cfg.paths.output_dir),
    )
    kw.update(overrides)
    return L.Trainer(**kw)


def throughput_callback(skip_batches: int = 0):
    """A callback measuring training samples/s: wall time from each batch's fetch to the end of its
    step, validation excluded; the first ``skip_batches`` batches (warm-up) are not counted."""
    from lightning.pytorch.callbacks import Callback

    class Throughput(Callback):
        def __init__(self) -> None:
            self.samples = 0
            self.seconds = 0.0
            self.batches = 0
            self._mark: float | None = None

        def on_train_epoch_start(self, trainer, pl_module):
            self._mark = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            self.batches += 1
            if self._mark is not None and self.batches > skip_batches:
                self.seconds += now - self._mark
                self.samples += int(batch[1].shape[0])
            self._mark = now

        def on_validation_end(self, trainer, pl_module):
            self._mark = time.perf_counter()

        @property
        def samples_per_s(self) -> float | None:
            return self.samples / self.seconds if self.seconds else None

    return Throughput()


def _callbacks(first_epoch: int, out: Path, patience: int | None):
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    class PhaseCheckpoint(ModelCheckpoint):
        """Best-by-val/auc checkpoint that ignores epochs before ``first_epoch`` (pretraining)."""

        def _save_topk_checkpoint(self, trainer, monitor_candidates):
            if trainer.current_epoch < first_epoch:
                return
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    class PhaseEarlyStopping(EarlyStopping):
        """Early stopping on val/auc that starts counting at ``first_epoch``."""

        def _should_skip_check(self, trainer):
            return trainer.current_epoch < first_epoch or super()._should_skip_check(trainer)

    ckpt = PhaseCheckpoint(
        dirpath=str(out),
        filename="best",
        monitor="val/auc",
        mode="max",
        save_top_k=1,
        save_last=True,
        enable_version_counter=False,
        auto_insert_metric_name=False,
    )
    cbs: list = [ckpt]
    if patience:
        cbs.append(PhaseEarlyStopping(monitor="val/auc", mode="max", patience=int(patience)))
    thr = throughput_callback()
    cbs.append(thr)
    return cbs, ckpt, thr


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
def build_module(cfg: DictConfig, feature_map):
    """``SearchModule`` for a gated method (ihas), ``CTRModule`` for ``method=base``."""
    from ..modules.ctr import CTRModule
    from ..modules.search import SearchModule

    model = OmegaConf.to_container(cfg.model, resolve=True)
    gated = bool(cfg.method.get("gated", False))
    if not gated:
        return CTRModule(
            feature_map.vocab_sizes, model, eval_mode="open", field_names=feature_map.field_names
        )
    gate = OmegaConf.to_container(cfg.method.gate, resolve=True)
    return SearchModule(
        feature_map.vocab_sizes,
        model,
        gate=gate,
        pretrain_epochs=int(cfg.search.pretrain_epochs),
        search_every=int(cfg.search.search_every),
        field_names=feature_map.field_names,
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


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train the search (or Base) model and write ``search/`` outputs; returns the metrics dict."""
    from ..data.datamodule import IHASDataModule
    from ..loggers import build_logger, finish_loggers
    from ..modules.search import SearchModule
    from ..report.figures import gate_histogram_png
    from .prepare import ensure_prepared

    epochs = int(cfg.search.epochs)
    gated = bool(cfg.method.get("gated", False))
    pretrain = int(cfg.search.pretrain_epochs) if gated else 0
    if epochs < 1:
        raise ConfigError(f"config key 'search.epochs': must be >= 1 (got {epochs})")
    if gated and not 0 <= pretrain < epochs:
        raise ConfigError(
            f"config key 'search.pretrain_epochs': must be in [0, search.epochs) so that at least one "
            f"search epoch remains (got {pretrain} with search.epochs={epochs})"
        )
    if gated and int(cfg.search.search_every) < 1:
        raise ConfigError("config key 'search.search_every': must be >= 1")
    if gated:
        check_gate_cfg(cfg.method.gate)
    resume = cfg.search.get("resume")
    if resume and not Path(str(resume)).is_file():
        raise DataError(f"{resume}: checkpoint to resume from not found (search.resume)")

    out_root = Path(str(cfg.paths.output_dir))
    out = out_root / SEARCH_DIR
    out.mkdir(parents=True, exist_ok=True)
    trainer_kwargs(cfg)  # fail early on unknown trainer keys
    # the manifest marks a complete search dir: drop a previous run's before writing anything new
    for stale in ("manifest.json", "metrics.json"):
        (out / stale).unlink(missing_ok=True)

    prepared = Path(ensure_prepared(cfg))
    seed_everything(int(cfg.seed))
    dm = IHASDataModule(
        str(prepared),
        batch_size=int(cfg.model.batch_size),
        eval_batch_size=int(cfg.evaluate.get("batch_size", cfg.model.batch_size)),
        seed=int(cfg.seed),
        search_batch_size=int(cfg.search.get("search_batch_size") or cfg.model.batch_size),
    )
    fmap = dm.feature_map
    synthetic = (prepared / "truth.json").is_file()
    module = build_module(cfg, fmap)
    if isinstance(module, SearchModule):
        module.set_search_loader(dm.search_dataloader())

    logger = build_logger(cfg, str(cfg.get("tag") or "search"))
    try:
        callbacks, ckpt_cb, throughput = _callbacks(pretrain, out, cfg.search.get("early_stopping_patience"))
        trainer = build_trainer(cfg, epochs, callbacks, logger)
        t0 = time.perf_counter()
        trainer.fit(
            module,
            train_dataloaders=dm.train_dataloader(),
            val_dataloaders=dm.val_dataloader(),
            ckpt_path=str(resume) if resume else None,
        )
        fit_seconds = time.perf_counter() - t0
        best = Path(ckpt_cb.best_model_path) if ckpt_cb.best_model_path else None
        if best is None or not best.is_file():
            best = out / BEST  # no phase-2 validation ran: the final weights are the result
            trainer.save_checkpoint(best)
        if not (out / LAST).is_file():
            trainer.save_checkpoint(out / LAST)

        val = trainer.validate(module, dataloaders=dm.val_dataloader(), ckpt_path=str(best), verbose=False)
        test = trainer.test(module, dataloaders=dm.test_dataloader(), ckpt_path=str(best), verbose=False)
        metrics: dict[str, Any] = {
            "method": str(cfg.method.name),
            "dataset": str(cfg.dataset.name),
            "val/auc": _metric(val, "val/auc"),
            "val/logloss": _metric(val, "val/logloss"),
            "test/auc": _metric(test, "test/auc"),
            "test/logloss": _metric(test, "test/logloss"),
            "best_epoch": _best_epoch(best),
            "epochs_run": int(trainer.current_epoch),
            "pretrain_epochs": pretrain,
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
            metrics["gate_steps"] = int(module.gate_steps)
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
        write_json(out / "metrics.json", metrics)
        _write_manifest(cfg, out, prepared, fmap, best)
        log.info(
            "search done: val/auc=%s test/auc=%s (%s)",
            metrics["val/auc"],
            metrics["test/auc"],
            out / "metrics.json",
        )
        return metrics
    finally:
        finish_loggers()


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
