"""Stages of the pipeline. Each module exposes ``check_cfg(cfg)`` and ``run(cfg) -> dict`` of metrics.

Stages are siblings: none imports another (checked by ``make lint``, import-linter); what they share
lives below them (:mod:`ihas_lightning.rundir`, :mod:`ihas_lightning.training`, ...), and
``stage=all`` (:mod:`ihas_lightning.pipeline`) sits above them.

Stages are imported lazily, so ``stage=prepare`` does not pay for importing Lightning.
"""

from __future__ import annotations

import importlib

from ..errors import ConfigError

STAGES = {
    "prepare": "ihas_lightning.stages.prepare",
    "search": "ihas_lightning.stages.search",
    "cluster": "ihas_lightning.stages.cluster",
    "derive": "ihas_lightning.stages.derive",
    "retrain": "ihas_lightning.stages.retrain",
    "evaluate": "ihas_lightning.stages.evaluate",
    "report": "ihas_lightning.stages.report",
    "predict": "ihas_lightning.stages.predict",
    "export": "ihas_lightning.stages.export",
}


def stage_module(name: str):
    """The module of stage ``name`` (imported on first use)."""
    if name not in STAGES:
        raise ConfigError(
            f"config key 'stage.name': unknown stage '{name}' (choose one of {sorted([*STAGES, 'all'])})"
        )
    return importlib.import_module(STAGES[name])
