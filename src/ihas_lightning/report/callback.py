"""A Hydra callback that writes the report when a multirun ends (``experiment=table2|table3|table4``),
so each of the paper's tables is one command. It reads the sweep dir like ``stage=report`` does
(``report.table`` picks the table; auto by default). With ``logger=wandb`` (the default; offline unless
``logger.wandb.mode=online``) the tables and their figures go to one W&B run, ``report-<sweep dir>``, in
the sweep's group (``logger.wandb.group``, e.g. ``table2-<dataset>``), beside the jobs' own runs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("ihas_lightning")


class MultirunReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ..loggers import build_logger, finish_loggers
        from .build import write_reports

        root = Path(str(config.hydra.sweep.dir))
        logger = None
        if OmegaConf.select(config, "logger.name") == "wandb":
            cfg = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
            with open_dict(cfg):
                cfg.pop("hydra", None)
                cfg.paths.output_dir = str(root)
            logger = build_logger(cfg, f"report-{root.name}")
            # loggers.is_wandb looks for wandb in sys.modules, and Lightning imports it lazily: in the
            # sweep's parent process nothing has yet, so without this the tables were never logged
            import wandb  # noqa: F401
        try:
            kind = str(OmegaConf.select(config, "report.table", default="auto"))
            rep = write_reports(root, logger=logger, kind=kind)
        finally:
            if logger is not None:
                finish_loggers()
        for name in rep["files"]:
            if name.endswith(".md"):
                log.info("report: %s", root / "report" / name)
                print((root / "report" / name).read_text(), flush=True)
        # the failed runs are listed once, in the tables printed above (and report.json), not again here
        if rep["missing"]:
            print(f"error: {len(rep['missing'])} of the multirun's jobs failed or are missing (listed in "
                  f"the report's 'Missing or failed runs'); the report covers the others", file=sys.stderr, flush=True)  # fmt: skip
            sys.exit(2)


#: the name experiment=table2 has always used
Table2Report = MultirunReport
