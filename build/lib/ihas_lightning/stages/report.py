"""``stage=report``: the paper's tables and figures from the run dirs of a multirun.

    python -m ihas_lightning -m experiment=table2 dataset=criteo seed=0,1,2     # writes it at the end
    python -m ihas_lightning stage=report report.dir=<multirun dir>           # (re)writes it

Reads every ``stage=all`` job dir under ``report.dir`` (see :mod:`ihas_lightning.report.table2`) and
writes, per dataset, the tables the runs make (``report.table``: auto | table2 | table3 | table4; see
:mod:`ihas_lightning.report.build`): ``table2_<dataset>.{md,csv}`` + ``figure4_<dataset>.png``
(methods), ``table3_<dataset>.{md,csv}`` (transfer to other backbones), ``table4_<dataset>.{md,csv}``
+ ``figure3/5/6_<dataset>.png`` (ablations), and ``report.json``, to ``report.out`` (default
``<report.dir>/report``); with the W&B logger the tables and figures are logged too. Missing or failed
runs are listed by name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..errors import ConfigError, DataError

log = logging.getLogger("ihas_lightning")


def check_cfg(cfg: DictConfig) -> None:
    from ..report.build import KINDS

    d = cfg.report.get("dir")
    if d in (None, "", "null"):
        raise ConfigError("config key 'report.dir': the multirun dir to read (e.g. outputs/multiruns/<...>)")
    if cfg.report.get("table", "auto") not in KINDS:
        raise ConfigError(
            f"config key 'report.table': must be one of {list(KINDS)} (got {cfg.report.get('table')!r})"
        )


def run(cfg: DictConfig) -> dict[str, Any]:
    from ..loggers import build_logger, finish_loggers
    from ..report.build import write_reports

    check_cfg(cfg)
    root = Path(str(cfg.report.dir)).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (report.dir)")
    out = cfg.report.get("out")
    logger = build_logger(cfg, f"report-{root.name}")
    try:
        rep = write_reports(root, Path(str(out)) if out else None, logger=logger,
                            kind=str(cfg.report.get("table", "auto")))  # fmt: skip
    finally:
        finish_loggers()
    if not rep["datasets"]:
        raise DataError(f"{root}: no stage=all job dirs (with .hydra/config.yaml) under it")
    outdir = Path(str(out)) if out else root / "report"
    for name in rep["files"]:
        if name.endswith(".md"):
            print((outdir / name).read_text(), flush=True)
    for m in rep["missing"]:
        log.warning("report: missing run %s: %s", m["job"], m["reason"])
    return {f"report/{ds}/runs": len(v["runs"]) for ds, v in rep["datasets"].items()}
