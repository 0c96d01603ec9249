"""Thin Hydra entry point: ``python -m ihas_lightning stage=<name> dataset=<name> ...``.

It only composes the config and hands it to the stage named by ``stage.name``; user errors
(:class:`~ihas_lightning.errors.IHASError`) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from .config import CONFIG_DIR, register_resolvers
from .errors import IHASError

register_resolvers()
log = logging.getLogger("ihas_lightning")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from .pipeline import run_stage

    if cfg.stage.name != "prepare":  # prepare never pays for importing Lightning
        import lightning  # noqa: F401

        # `import lightning` adds its own console handler; Hydra's root handlers (console + the
        # run dir's log file) already receive those records, so every line would print twice
        logging.getLogger("lightning").handlers.clear()
    try:
        metrics = run_stage(cfg)
    except IHASError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if _in_multirun():
            # one failed job must not end the sweep: record why (the report lists it by name) and go on;
            # the Table 2 callback exits with status 2 at the end when a job failed
            try:
                out = Path(str(cfg.paths.output_dir))
                out.mkdir(parents=True, exist_ok=True)
                (out / "error.txt").write_text(f"error: {e}\n")
            except Exception:  # noqa: BLE001 - the error line above is what matters
                pass
            return None
        sys.exit(2)
    # a scalar for Hydra sweepers (optuna etc.): a VALIDATION AUC (never test: hyperparameters are
    # chosen on validation) -- the method's final model for stage=all/evaluate, the stage's model otherwise
    for key in ("final/val/auc", "routed/val/auc", "val/auc"):
        if isinstance(metrics, dict) and key in metrics:
            return float(metrics[key])
    return None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not under Hydra (a test calling main's body)
        return False


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()
