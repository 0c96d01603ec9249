"""Stages of the pipeline. Each module exposes ``run(cfg) -> dict`` of metrics.

Stages are imported lazily, so ``stage=prepare`` does not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

from omegaconf import DictConfig

from ..errors import ConfigError

STAGES = {
    "prepare": "ihas_lightning.stages.prepare",
    "search": "ihas_lightning.stages.search",
    "cluster": "ihas_lightning.stages.cluster",
    "retrain": "ihas_lightning.stages.retrain",
    "evaluate": "ihas_lightning.stages.evaluate",
    "all": "ihas_lightning.stages.pipeline",
}


def run_stage(cfg: DictConfig) -> dict[str, Any]:
    name = cfg.stage.name
    if name not in STAGES:
        raise ConfigError(f"config key 'stage.name': unknown stage '{name}' (choose one of {sorted(STAGES)})")
    module = importlib.import_module(STAGES[name])
    return module.run(cfg)
