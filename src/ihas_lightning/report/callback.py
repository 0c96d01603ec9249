"""A Hydra callback that writes Table 2 / Figure 4 when a multirun ends (``experiment=table2``), so the
paper's comparison is one command. It reads the sweep dir like ``stage=report`` does."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("ihas_lightning")


class Table2Report(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ..loggers import build_logger, finish_loggers
        from .table2 import write_report

        root = Path(str(config.hydra.sweep.dir))
        logger = None
        if OmegaConf.select(config, "logger.name") == "wandb":
            cfg = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
            with open_dict(cfg):
                cfg.pop("hydra", None)
                cfg.paths.output_dir = str(root)
            logger = build_logger(cfg, f"report-{root.name}")
        try:
            rep = write_report(root, logger=logger)
        finally:
            if logger is not None:
                finish_loggers()
        for ds in rep["datasets"]:
            log.info("table2: %s", root / "report" / f"table2_{ds}.md")
            print((root / "report" / f"table2_{ds}.md").read_text(), flush=True)
        for m in rep["missing"]:
            log.warning("table2: missing run %s: %s", m["job"], m["reason"])
        if rep["missing"]:
            print(f"error: {len(rep['missing'])} of the multirun's jobs failed or are missing (listed in "
                  f"{root / 'report'}); the report covers the others", file=sys.stderr, flush=True)  # fmt: skip
            sys.exit(2)
