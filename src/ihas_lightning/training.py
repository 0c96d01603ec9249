"""How every model of the framework is fitted: a Lightning Trainer bounded by a max-epochs budget,
early-stopped on a validation monitor with patience, the best checkpoint kept and restored.

Used by the search stage (Base, pretraining + bi-level search) and the retrain stage (one model per
cluster), so "trains to convergence" means the same thing everywhere:

* ``monitor``: ``val/logloss`` (default: it rewards calibrated predictions, which the routed iHAS
  needs because the clusters' predictions are pooled into one AUC) or ``val/auc``; the bi-level
  search phase also offers ``val/objective`` (its default: validation logloss + the gate
  regularizer, the quantity the gate steps minimise, so selection does not undo the sparsity);
* ``patience``: epochs without improvement before stopping (``null``: run the whole budget);
* the selection callbacks skip the pretraining epochs of a search (``module.in_pretrain``), whose
  validation runs with open gates.

``cfg.trainer`` holds Lightning Trainer arguments. Budgets are per stage, in epochs
(``search.max_epochs``, ``search.pretrain.max_epochs``, ``retrain.max_epochs``): ``trainer.max_epochs``
and the other budget keys are rejected with a one-line error naming the stage keys (Lightning's
``global_step`` counts optimizer steps, 2-3 per batch under manual optimization, so step budgets
would mislead).
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

MONITORS = ("val/logloss", "val/auc", "val/objective")
BUDGET_KEYS = ("max_epochs", "min_epochs", "max_steps", "min_steps", "max_time")
OWNED_KEYS = ("callbacks", "logger", "default_root_dir", "enable_checkpointing")
STAGE_BUDGETS = "search.max_epochs, search.pretrain.max_epochs and retrain.max_epochs"


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.trainer`` as Trainer kwargs (null values dropped); a one-line ConfigError for an unknown
    key, a budget key (use the stage keys) or a key the stages set themselves."""
    import lightning as L

    tcfg = OmegaConf.to_container(cfg.get("trainer") or {}, resolve=True)
    assert isinstance(tcfg, dict)
    tcfg.pop("threads", None)  # ours, not Lightning's: the torch thread count (ihas_lightning.threads)
    tcfg.pop("malloc_tuning", None)  # ours: glibc malloc thresholds (ihas_lightning.allocator)
    allowed = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    out = {}
    for key, value in tcfg.items():
        if key not in allowed:
            raise ConfigError(f"config key 'trainer.{key}': not a lightning.Trainer argument")
        if value is None:
            continue
        if key in BUDGET_KEYS:
            raise ConfigError(
                f"config key 'trainer.{key}': training budgets are set per stage, in epochs, and every "
                f"fit is early-stopped on validation: use {STAGE_BUDGETS} (e.g. search.max_epochs={value})"
            )
        if key in OWNED_KEYS:
            raise ConfigError(f"config key 'trainer.{key}': set by the stages themselves; leave it out")
        out[key] = value
    strategy = out.get("strategy")
    if (
        isinstance(strategy, str)
        and strategy != "auto"
        and strategy.split("_")[0] in ("ddp", "fsdp", "deepspeed")
    ):
        if strategy != "ddp":
            raise ConfigError(
                f"config key 'trainer.strategy': {strategy!r} is not supported; multi-process training is "
                "trainer=ddp (strategy=ddp: Lightning's DDP launcher with our own gradient averaging, "
                "ihas_lightning/distributed.py)"
            )
        from .distributed import manual_ddp_strategy

        out["strategy"] = manual_ddp_strategy()
    return out


def check_trainer(cfg: DictConfig) -> None:
    """``trainer.*`` as Lightning reads them: a Trainer is built from them (no logger, no checkpoints)
    and thrown away, so ``trainer.accelerator=tpu`` or ``trainer.precision=7`` fail before any work."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    errors = (MisconfigurationException, ValueError, TypeError, RuntimeError, ImportError)

    def build(**kw: Any) -> None:
        L.Trainer(**kw, max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)

    kw = trainer_kwargs(cfg)
    kw.pop("enable_progress_bar", None)
    try:
        build(**kw)
    except errors as e:
        key = "trainer"
        for k, v in kw.items():  # the key that fails on its own
            try:
                build(**{k: v})
            except errors:
                key = f"trainer.{k}"
                break
        raise ConfigError(f"config key '{key}': {str(e).splitlines()[0]}") from None


def check_monitor(value: Any, key: str, allowed: tuple[str, ...] = ("val/logloss", "val/auc")) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}': must be one of {list(allowed)} (got {value!r})")


def check_fit_cfg(node: Any, prefix: str, min_epochs: int = 1) -> None:
    """Validate ``<prefix>.max_epochs`` (>= ``min_epochs``), ``.patience`` (>= 0 or null) and ``.monitor``."""
    me = node.get("max_epochs")
    if not isinstance(me, int) or isinstance(me, bool) or me < min_epochs:
        raise ConfigError(
            f"config key '{prefix}.max_epochs': must be an integer >= {min_epochs} (got {me!r})"
        )
    pat = node.get("patience")
    if pat is not None and (not isinstance(pat, int) or isinstance(pat, bool) or pat < 0):
        raise ConfigError(f"config key '{prefix}.patience': must be an integer >= 0 or null (got {pat!r})")
    if "monitor" in node:
        check_monitor(node.get("monitor"), f"{prefix}.monitor")


def build_trainer(cfg: DictConfig, max_epochs: int, callbacks: list, logger: Any, root: Path, **overrides):
    """``L.Trainer(**cfg.trainer)`` with a stage's epoch budget, callbacks and logger."""
    import lightning as L

    kw = trainer_kwargs(cfg)
    from .threads import AUTO, adapts, thread_tuner

    tcfg = cfg.get("trainer") or {}
    if adapts(tcfg.get("threads", AUTO), tcfg.get("deterministic")):
        import torch

        if torch.get_num_threads() > 1:  # adaptive: re-chosen while the fit runs (opt-in, not the default:
            # a different count can change the numbers in the last bits, see threads.thread_tuner)
            callbacks = [*callbacks, thread_tuner(torch.get_num_threads())]
    kw.update(
        max_epochs=int(max_epochs),
        callbacks=callbacks,
        logger=logger if logger is not None else False,
        default_root_dir=str(root),
    )
    kw.update(overrides)
    return L.Trainer(**kw)


def selection_callbacks(
    out: Path, monitor: str, patience: int | None, save_last: bool = True, sparsest: Any = None
):
    """(callbacks, checkpoint callback): the best checkpoint ``out/best.ckpt`` by ``monitor`` and
    early stopping with ``patience``, both ignoring epochs where ``module.in_pretrain(epoch)``.

    ``sparsest`` (a :class:`~ihas_lightning.modules.selection.SparsestSelection`): it writes
    ``best.ckpt`` instead (the sparsest epoch within tolerance of the gates-open model) and is the
    returned checkpoint callback; ``last.ckpt`` is still saved every epoch."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    mode = "max" if monitor.endswith("auc") else "min"

    class PhaseCheckpoint(ModelCheckpoint):
        def _save_topk_checkpoint(self, trainer, monitor_candidates):
            if trainer.lightning_module.in_pretrain(trainer.current_epoch):
                return
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    class PhaseEarlyStopping(EarlyStopping):
        def _should_skip_check(self, trainer):
            return trainer.lightning_module.in_pretrain(trainer.current_epoch) or super()._should_skip_check(
                trainer
            )

    class LastOnly(ModelCheckpoint):
        """last.ckpt after every validation of the fit (best.ckpt is the selection rule's)."""

        def on_validation_end(self, trainer, pl_module):
            if self.save_last and not self._should_skip_saving_checkpoint(trainer):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    ckpt = (LastOnly if sparsest is not None else PhaseCheckpoint)(
        dirpath=str(out),
        filename="best",
        monitor=None if sparsest is not None else monitor,
        mode=mode,
        save_top_k=0 if sparsest is not None else 1,
        save_last=save_last,
        enable_version_counter=False,
        auto_insert_metric_name=False,
    )
    cbs: list = [ckpt]
    if sparsest is not None:  # the rule also stops the search (no new choice for `patience` epochs)
        sparsest.patience = None if patience is None else int(patience)
        return [sparsest, ckpt], sparsest  # the rule first: last.ckpt then holds its state of this epoch
    if patience is not None:
        cbs.append(PhaseEarlyStopping(monitor=monitor, mode=mode, patience=int(patience)))
    return cbs, ckpt


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


# ---- fit one CTR model to convergence ------------------------------------------------------------
def fit_ctr(
    module: Any,
    dm: Any,
    cfg: DictConfig,
    out: Path,
    max_epochs: int,
    patience: int | None,
    logger: Any = None,
    monitor_val: bool = True,
    monitor: str = "val/logloss",
    ckpt_dir: Path | None = None,
    resume: Path | None = None,
    keep_init: bool = False,
    init_confidence: float = 0.0,
) -> dict[str, Any]:
    """Fit ``module`` (a CTRModule) on ``dm`` up to ``max_epochs``, early-stopped on ``monitor``; write
    ``out/best.ckpt`` (best ``monitor``) and return {val auc/logloss and test auc/logloss of the best
    checkpoint, epochs run, seconds, params}.

    ``ckpt_dir``: where the fit keeps its checkpoints meanwhile (``best.ckpt`` and ``last.ckpt``, so a
    killed fit can continue: ``resume`` = a ``last.ckpt`` of the same fit); default ``out``, no last.

    ``keep_init``: the weights the fit starts from are a candidate too (validated before the first step,
    ``best_epoch`` -1 when kept): a warm-started fit is then never worse on validation than its start.
    With ``init_confidence`` > 0 the trained model must *prove* it: it replaces the start only where the
    one-sided ``init_confidence`` bound of its paired per-row excess validation logloss over the start is
    below 0 (on a few hundred rows with a handful of positives, a lower mean is mostly noise)."""
    init = _validate_init(module, dm, cfg, ckpt_dir or out, monitor) if keep_init and monitor_val else None
    callbacks: list[Any] = []
    ckpt_cb = None
    overrides: dict[str, Any] = {"enable_checkpointing": monitor_val}
    if monitor_val:
        callbacks, ckpt_cb = selection_callbacks(
            ckpt_dir or out, monitor, patience, save_last=ckpt_dir is not None
        )
    else:
        overrides["limit_val_batches"] = 0
    trainer = build_trainer(cfg, max_epochs, callbacks, logger, out, **overrides)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume is not None else None)
    fit_s = time.perf_counter() - t0
    module, best, best_score, best_epoch = _fit_result(
        trainer, ckpt_cb, module, dm, cfg, out, monitor, init, init_confidence
    )
    val = trainer.validate(module, datamodule=dm, verbose=False) if monitor_val else [{}]
    test = trainer.test(module, datamodule=dm, verbose=False)
    return {
        "best_ckpt": str(best),
        "val_auc": _f(val[0].get("val/auc")) if val else None,
        "val_logloss": _f(val[0].get("val/logloss")) if val else None,
        "best_monitor_during_fit": best_score,
        "test_auc": _f(test[0].get("test/auc")) if test else None,
        "test_logloss": _f(test[0].get("test/logloss")) if test else None,
        "best_epoch": best_epoch,
        "epochs_run": int(trainer.current_epoch),
        "fit_seconds": round(fit_s, 3),
        "params": int(module.model.num_parameters()),
    }


def _fit_result(trainer, ckpt_cb, module, dm, cfg: DictConfig, out: Path, monitor: str, init, conf: float):
    """The fit's result as ``out/best.ckpt``: the best checkpoint, or the start where it is kept
    (``keep_init``), or the last weights without validation: (module loaded from it, path, score,
    epoch; -1 for the start)."""
    import torch

    from .distributed import is_global_zero

    best = out / "best.ckpt"
    have_best = (
        ckpt_cb is not None and bool(ckpt_cb.best_model_path) and Path(ckpt_cb.best_model_path).is_file()
    )
    # trainer=ddp: every rank takes rank 0's decision (rank 0 moves the file right after deciding)
    if not trainer.strategy.broadcast(have_best):  # fast_dev_run / no validation: the last weights
        trainer.save_checkpoint(str(best))
        return module, best, None, int(trainer.current_epoch)
    if is_global_zero() and Path(ckpt_cb.best_model_path).resolve() != best.resolve():
        Path(ckpt_cb.best_model_path).replace(best)
    best = Path(trainer.strategy.broadcast(str(best)))  # rank 0's file (trainer=ddp)
    trainer.strategy.barrier("fit_ctr best")
    best_score = float(ckpt_cb.best_model_score) if ckpt_cb.best_model_score is not None else None
    best_epoch = int(torch.load(best, map_location="cpu", weights_only=True).get("epoch", -1))
    if init is not None and _start_wins(init, best, module, dm, cfg, monitor, best_score, conf):
        # the trained model did not beat its start on validation: the start is the result (rank 0
        # moves the file)
        if is_global_zero():
            Path(init[0]).replace(best)
        trainer.strategy.barrier("fit_ctr init")
        best_score, best_epoch = init[1], -1
    module = type(module).load_from_checkpoint(str(best), map_location="cpu", weights_only=True)
    return module, best, best_score, best_epoch


def _better(a: float | None, b: float | None, monitor: str) -> bool:
    """``a`` is strictly better than ``b`` on ``monitor`` (a missing ``b`` is beaten by any ``a``)."""
    if a is None:
        return False
    if b is None:
        return True
    return a > b if monitor.endswith("auc") else a < b


def _start_wins(
    init, best: Path, module: Any, dm: Any, cfg: DictConfig, monitor: str, best_score, conf: float
):
    """Keep the fit's start (``init`` = (path, score, per-row losses)) instead of ``best``?"""
    if conf <= 0 or init[2] is None:
        return _better(init[1], best_score, monitor)
    from .modules.selection import excess_upper

    trained = type(module).load_from_checkpoint(str(best), map_location="cpu", weights_only=True)
    rows = val_rows(trained, dm, cfg, best.parent)[0]
    upper = excess_upper(rows, init[2], conf)
    return _better(init[1], best_score, monitor) if upper is None else upper >= 0.0


def val_rows(module: Any, dm: Any, cfg: DictConfig, where: Path):
    """Validate ``module`` on a throwaway trainer: (per-row validation losses or None, the validation
    results, the trainer). No inference mode: the module's metric states must stay normal tensors for
    a fit that follows."""
    import torch

    trainer = build_trainer(cfg, 1, [], None, where, enable_checkpointing=False, inference_mode=False)
    module.row_losses = []
    res = trainer.validate(module, datamodule=dm, verbose=False)
    from .distributed import gather_rows

    rows, module.row_losses = module.row_losses, None
    return gather_rows(torch.cat(rows) if rows else None, cols=3), res, trainer  # ddp: every rank's rows


def _validate_init(module: Any, dm: Any, cfg: DictConfig, where: Path, monitor: str) -> tuple | None:
    """Validate ``module`` as it is (before any step) and save it as ``where/init.ckpt``: (path, its
    ``monitor``, its per-row validation losses), None when no validation metric came out."""
    rows, res, trainer = val_rows(module, dm, cfg, where)
    score = (res[0] if res else {}).get(monitor)
    if score is None:
        return None
    path = Path(where) / "init.ckpt"
    trainer.save_checkpoint(str(path))
    return str(path), float(score), rows


def _f(v: Any) -> float | None:
    return None if v is None else float(v)
