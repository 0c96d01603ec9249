"""Thin Hydra entry point: ``python -m ihas_lightning stage=<name> dataset=<name> ...``.

It only composes the config and hands it to the stage named by ``stage.name``; user errors
(:class:`~ihas_lightning.errors.IHASError`) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

_SIGINT = {"seen": False}
_STARTED = {"job": False}


def _on_sigint(signum, frame):
    """Ctrl-C: remember it (Lightning turns it into ``sys.exit(1)``) and raise KeyboardInterrupt."""
    _SIGINT["seen"] = True
    raise KeyboardInterrupt


if __name__ == "__main__":  # before the heavy imports: a Ctrl-C while importing is one line too
    signal.signal(signal.SIGINT, _on_sigint)

import hydra  # noqa: E402 - after the SIGINT handler
from omegaconf import DictConfig  # noqa: E402 - after the SIGINT handler

from .config import CONFIG_DIR, register_resolvers  # noqa: E402 - after the SIGINT handler
from .errors import IHASError  # noqa: E402 - after the SIGINT handler

register_resolvers()
log = logging.getLogger("ihas_lightning")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    _STARTED["job"] = True  # from here on an uncaught exception is ours (a bug: full traceback)
    try:
        from .pipeline import run_stage
        from .validate import check_config

        check_config(cfg, trainer=False)  # every key but trainer.*, before importing Lightning (~4 s)
        if cfg.stage.name != "prepare":  # prepare never pays for importing Lightning
            import lightning  # noqa: F401

            # `import lightning` adds its own console handler; Hydra's root handlers (console + the
            # run dir's log file) already receive those records, so every line would print twice
            logging.getLogger("lightning").handlers.clear()
        _quiet_console()
        metrics = run_stage(cfg)
    except (KeyboardInterrupt, SystemExit) as e:
        # Lightning turns Ctrl-C inside fit() into sys.exit(1) after its graceful shutdown
        if not (isinstance(e, KeyboardInterrupt) or _SIGINT["seen"]):
            raise
        msg = (f"interrupted (Ctrl-C); outputs of finished stages are kept in {cfg.paths.output_dir}: re-run "
               "the same command with paths.output_dir=<that dir> to resume")  # fmt: skip
        print(msg, file=sys.stderr, flush=True)
        _to_log_file(msg)
        sys.exit(130)
    except IHASError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        _to_log_file(f"error: {e}")  # also in the run dir's log file (stderr already has it)
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


# console noise a user cannot act on (still written to the run dir's log file)
_NOISE = (
    "GPU available",
    "TPU available",
    "HPU available",
    "litlogger",
    "has `__len__` defined",
    "log_every_n_steps",
    "LeafSpec",
    "does not have many workers",
    "modules in eval mode",
    "Restoring states from the checkpoint",
    "Loaded model weights from the checkpoint",
    "exists and is not empty",  # our own stage dir (started.json, snapshots/) before Lightning writes
)


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        msg = record.getMessage()
        return not any(n in msg for n in _NOISE)


def _quiet_console() -> None:
    """Route warnings through logging (so the run's log file keeps them all) and drop the known noise
    from the console handlers only; progress bars and result tables are untouched."""
    logging.captureWarnings(True)
    for h in logging.getLogger().handlers:
        if not isinstance(h, logging.FileHandler):
            h.addFilter(_ConsoleFilter())


def _to_log_file(message: str) -> None:
    """Write ``message`` to the run's log file(s) only (Hydra's file handler), not the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not under Hydra (a test calling main's body)
        return False


def config_error_line(e: BaseException) -> str:
    """Hydra's / OmegaConf's multi-line composition error as one line naming the key (or group)."""
    from omegaconf.errors import OmegaConfBaseException

    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else None
    src = cause if cause is not None else e
    key = getattr(src, "full_key", None)
    lines = [ln.strip() for ln in str(src).splitlines() if ln.strip()]
    detail = [ln for ln in lines if not ln.startswith(("full_key:", "reference_type=", "object_type="))]
    if key:
        what = detail[0] if detail else type(src).__name__
        if "is not in struct" in what:  # an open node (trainer, dataset): keys may be added with +
            what = "no such key (add a new one with +" + str(key) + "=...)"
        elif "Key '" in what and " not in '" in what:  # a schema node: its keys are fixed
            from dataclasses import fields

            from . import schema

            node = getattr(schema, what.split(" not in '")[1].rstrip("'"), None)
            names = ", ".join(f.name for f in fields(node)) if node is not None else ""
            what = f"no such key (the keys of {key.rsplit('.', 1)[0]}: {names})" if names else "no such key"
        return f"config key '{key}': {what}"
    msg = str(e).split("Config search path:")[0].splitlines()
    first = msg[0].strip().removeprefix("In 'config': ") if msg else type(e).__name__
    options = [ln.strip() for ln in msg[1:] if ln.startswith("\t") and not ln.strip().startswith("_")]
    if options:  # "Could not find 'method/nope'" + "Available options in 'method':" + one per line
        return f"{first}; available: {', '.join(options)}"
    if type(e).__name__ == "OverrideParseException":
        return f"a command-line override does not parse: {first} (syntax: key=value, group=option)"
    return first


def _cli() -> None:
    """Run :func:`main`; a config that does not compose (unknown key or option, wrong type, bad
    override syntax) is one line and exit 2, like every other user error. ``HYDRA_FULL_ERROR=1`` set
    by the user keeps Hydra's full report."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    user_full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its own report
    os.environ.setdefault("WANDB_SILENT", "true")  # offline W&B: its lines add nothing to the console
    try:
        main()
    except KeyboardInterrupt:  # before a run dir exists (composing the config, importing)
        print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(130)
    except (HydraException, OmegaConfBaseException) as e:
        if user_full or _STARTED["job"]:
            raise
        print(f"error: {config_error_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    _cli()
