"""Experiment loggers: Weights & Biases (default, offline unless ``logger.wandb.mode=online``), CSV, none.

``build_logger(cfg, run_name)`` returns a Lightning logger (or ``None`` for ``logger=none``);
``finish_loggers()`` closes an active W&B run (call it in a ``finally`` so each job of a multirun
gets its own run); ``log_histogram`` logs a histogram (e.g. the gate probabilities, paper Figure 3)
to W&B when the logger is W&B and does nothing otherwise (the PNG is written separately).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

LOGGERS = ("wandb", "csv", "none")


def _get(node: Any, key: str, default: Any = None) -> Any:
    if node is None:
        return default
    v = node.get(key, default) if hasattr(node, "get") else default
    return default if v is None else v


def build_logger(cfg: DictConfig, run_name: str):
    """The Lightning logger chosen by ``logger.name`` (wandb | csv | none); ``None`` for none.

    Inside :class:`run_scope` it returns the scope's logger (prefixed by :class:`scope_prefix`)."""
    if _SCOPE:
        shared, prefix = _SCOPE.get("logger"), _SCOPE.get("prefix")
        return PrefixedLogger(shared, prefix) if shared is not None and prefix else shared
    lcfg = cfg.get("logger")
    name = _get(lcfg, "name", "none")
    if name not in LOGGERS:
        raise ConfigError(
            f"config key 'logger.name': unknown logger '{name}' (choose one of {list(LOGGERS)})"
        )
    if name == "none":
        return None
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        save_dir = Path(_get(lcfg.get("csv"), "save_dir", cfg.paths.output_dir))
        save_dir.mkdir(parents=True, exist_ok=True)
        return CSVLogger(save_dir=str(save_dir), name="csv", version=run_name)
    from lightning.pytorch.loggers import WandbLogger

    w = lcfg.get("wandb") or {}
    mode = _get(w, "mode", "offline")
    if mode not in ("offline", "online", "disabled"):
        raise ConfigError(
            f"config key 'logger.wandb.mode': must be offline, online or disabled (got '{mode}')"
        )
    save_dir = Path(_get(w, "save_dir", cfg.paths.output_dir))
    save_dir.mkdir(parents=True, exist_ok=True)
    tags = list(_get(w, "tags", []))
    lg = WandbLogger(
        name=run_name,
        project=_get(w, "project", "ihas-lightning"),
        entity=_get(w, "entity", None),
        group=_get(w, "group", None),
        tags=tags or None,
        save_dir=str(save_dir),
        mode=mode,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    # Lightning always passes anonymous=None, which wandb >= 0.19 answers with a deprecation warning
    getattr(lg, "_wandb_init", {}).pop("anonymous", None)
    return lg


def is_wandb(logger: Any) -> bool:
    if logger is None or "wandb" not in sys.modules:
        return False
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(getattr(logger, "_inner", logger), WandbLogger)


def log_histogram(logger: Any, key: str, hist: dict[str, list[float]], step: int | None = None) -> None:
    """Log ``{"counts": [...], "edges": [...]}`` as a ``wandb.Histogram`` when ``logger`` is W&B."""
    if not is_wandb(logger):
        return
    import numpy as np
    import wandb

    h = wandb.Histogram(np_histogram=(np.asarray(hist["counts"]), np.asarray(hist["edges"])))
    payload: dict[str, Any] = {key: h}
    if step is not None:
        payload["trainer/global_step"] = step
    logger.experiment.log(payload)


def finish_loggers() -> None:
    """``wandb.finish()`` if a W&B run is active (no-op otherwise, and wandb is not imported)."""
    if _SCOPE:  # a multi-stage job (run_scope) finishes its run at the scope's end
        return
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is not None:
        wandb.finish()


# ---- one logger for a multi-stage job (stage=all), images and tables -----------------------------------
# Added for the cluster / retrain / evaluate / all stages. Inside ``run_scope`` every ``build_logger``
# call returns a view of ONE logger (one W&B run per job, even when several stages and Trainers run),
# its metrics prefixed by the current ``scope_prefix``; ``finish_loggers`` is deferred to the scope's end.
_SCOPE: dict[str, Any] = {}


class PrefixedLogger:
    """Wrap a Lightning logger so every metric is logged as ``<prefix>/<name>`` (several Trainers of
    one run -- Base, search, each cluster's retraining -- share one W&B run without key collisions)."""

    def __new__(cls, inner: Any, prefix: str):
        from lightning.pytorch.loggers import Logger

        class _Prefixed(Logger):
            def __init__(self) -> None:
                super().__init__()
                self._inner = inner
                self._prefix = prefix

            @property
            def name(self) -> str:
                return self._inner.name

            @property
            def version(self):
                return self._inner.version

            @property
            def save_dir(self):
                return getattr(self._inner, "save_dir", None)

            @property
            def log_dir(self):
                return getattr(self._inner, "log_dir", None)

            @property
            def experiment(self):
                return self._inner.experiment

            def log_metrics(self, metrics, step=None) -> None:
                self._inner.log_metrics({f"{self._prefix}/{k}": v for k, v in metrics.items()}, step)

            def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
                return None  # the job's config is logged once, by the scope's logger

            def save(self) -> None:
                self._inner.save()

            def finalize(self, status: str) -> None:
                self._inner.save()  # the job continues after this Trainer; the scope finishes it

        return _Prefixed()


def unwrap(logger: Any) -> Any:
    return getattr(logger, "_inner", logger)


class run_scope:
    """``with run_scope(cfg, name) as logger:`` one logger (one W&B run) for a multi-stage job."""

    def __init__(self, cfg: DictConfig, run_name: str):
        self.cfg, self.run_name = cfg, run_name

    def __enter__(self):
        logger = build_logger(self.cfg, self.run_name)
        _SCOPE.update(logger=logger, prefix=None)
        return logger

    def __exit__(self, *exc: Any) -> None:
        _SCOPE.clear()
        finish_loggers()


class scope_prefix:
    """``with scope_prefix("search"):`` loggers built inside log under ``search/...``."""

    def __init__(self, prefix: str | None):
        self.prefix = prefix
        self.saved: Any = None

    def __enter__(self):
        self.saved = _SCOPE.get("prefix")
        if _SCOPE:
            _SCOPE["prefix"] = self.prefix
        return self

    def __exit__(self, *exc: Any) -> None:
        if _SCOPE:
            _SCOPE["prefix"] = self.saved


def log_image(logger: Any, key: str, path: str | Path) -> None:
    """Log a PNG as ``wandb.Image`` when ``logger`` is W&B (no-op otherwise)."""
    if not is_wandb(logger) or not Path(path).is_file():
        return
    import wandb

    unwrap(logger).experiment.log({key: wandb.Image(str(path))})


def log_table(logger: Any, key: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Log a ``wandb.Table`` when ``logger`` is W&B (no-op otherwise)."""
    if not is_wandb(logger):
        return
    import wandb

    unwrap(logger).experiment.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})
