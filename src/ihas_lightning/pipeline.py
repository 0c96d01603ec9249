"""``stage=all``: a method's whole pipeline in one run dir (for iHAS: paper Figure 1 / Algorithm 1).

    prepare (if needed) -> Base (``stage.train_base``) -> the method's ``phases``

Base is fitted once: where the search's pretraining is Base's fit (iHAS's defaults: same init, every
train row, the same budget and stopping rule; :func:`~ihas_lightning.stages.search.pretraining_is_base`)
Base is written after the search from its restored pretrained weights, scored as a fitted Base is
(``base/search/metrics.json`` says ``derived_from``); elsewhere Base is fitted first.

The phases come from the method's config (``conf/method/<name>.yaml``): iHAS ``search -> cluster ->
retrain -> evaluate``; AutoField and OptFS ``search -> derive -> retrain -> evaluate``; AdaFS and Base
``search -> evaluate``. This orchestrator sits above the stages (which never import each other) and
runs each by name through :func:`ihas_lightning.stages.run_stage`.

Run-dir layout (every stage dir carries a ``manifest.json``: config hash + parent artifacts)::

    base/search/{best.ckpt, last.ckpt, metrics.json, manifest.json}   the Base row (search stage, method=base)
    search/{best.ckpt, last.ckpt, metrics.json, gate_hist.png, manifest.json}
    cluster/{centroids.pt, assign_*.npy, cluster.json, dims_heatmap.png, manifest.json}
    retrain/cluster_<k>/{best.ckpt, metrics.json, manifest.json}, retrain/{retrain.json, manifest.json}
    evaluate/{results.json, results.md, manifest.json}
    pipeline.json                                                         per-stage status and seconds

One logger serves the whole job (:class:`~ihas_lightning.loggers.run_scope`: one W&B run, finished in
a ``finally``), the stages' metrics prefixed (``base/``, ``search/``, ``retrain/cluster_<k>/`` ...).

Resume: re-running ``stage=all paths.output_dir=<that run dir>`` (or ``hydra.run.dir=...``) skips
every stage whose output is complete and whose manifest has the same config hash and parents:
Base and search (``best.ckpt`` + ``metrics.json`` + matching manifest), cluster (same search
checkpoint content), and each retrained cluster separately; evaluate always runs (it is cheap).
An interrupted search can also continue from its ``last.ckpt`` with ``search.resume=PATH``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from . import method
from .config import load_group_option
from .stages import stage_module
from .utils import read_json, write_json

log = logging.getLogger("ihas_lightning")

#: the phases that train (every rank takes part under trainer=ddp); the others run on rank 0 alone
FIT_STAGES = ("search", "retrain")


def base_config(cfg: DictConfig) -> DictConfig:
    """The Base model's config: ``method=base`` (no selector), output under ``<run dir>/base``."""
    from .rundir import BASE_DIR, output_dir

    cb = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(cb):
        cb.method = load_group_option("method", "base")
        cb.paths.output_dir = str(output_dir(cfg) / BASE_DIR)
        cb.search.resume = None
    return cb


def run_search_or_resume(cfg: DictConfig, prepared: Path, derive_from: Path | None = None) -> dict[str, Any]:
    """search.run(cfg), unless its output dir is already complete for this config (resume). Base with
    ``derive_from`` (a finished search dir whose pretraining is Base's fit): taken from that
    pretraining (:func:`~ihas_lightning.stages.search.base_from_pretraining`), fitted only where it
    left no record."""
    from .artifacts import is_current, make_manifest
    from .rundir import SEARCH_DIR

    search = stage_module("search")

    out = Path(str(cfg.paths.output_dir)) / SEARCH_DIR
    expected = make_manifest(
        "search", cfg, search.MANIFEST_KEYS, parents=search.manifest_parents(cfg, prepared)
    )
    if not cfg.search.get("resume") and is_current(out, expected, [search.BEST, "metrics.json"]):
        log.info("stage=all: %s is up to date (same config hash); skipping (resume)", out)
        m = read_json(out / "metrics.json")
        m["resumed"] = True
        return m
    if derive_from is not None and not cfg.search.get("resume"):
        derived = search.base_from_pretraining(cfg, derive_from)
        if derived is not None:
            return derived
    last = out / search.LAST
    started = out / search.STARTED
    if not cfg.search.get("resume") and last.is_file() and started.is_file():
        from .artifacts import same_origin

        if same_origin(read_json(started), expected):
            # a search of this very config was killed: continue from its last epoch (Lightning restores
            # the weights, the optimizers, the epoch and the callbacks' state)
            log.info("stage=all: %s holds a killed search of this config; resuming from %s", out, last)
            cr = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
            with open_dict(cr):
                cr.search.resume = str(last)
            return search.run(cr)
    return search.run(cfg)


def transfer_source(cfg: DictConfig, prepared: Path) -> dict[str, Any]:
    """Transfer: the source search in ``transfer.from``. Used as it is when it holds a complete search
    (its manifest); else, with ``transfer.search_if_missing``, the method's search is run there with
    ``transfer.source_backbone`` (a Table 3 sweep's first job of a (method, seed) does it, the others
    reuse it)."""
    from .errors import DataError

    src = method.transfer_dir(cfg)
    done = (src / "search" / "manifest.json").is_file() and method.transfer_ckpt(cfg).is_file()
    if done:
        log.info("stage=all: transfer from %s (its search is complete)", src)
        return {"source": str(src), "searched": False}
    if not bool(cfg.transfer.search_if_missing):
        raise DataError(
            f"{src}/search: no complete search to transfer from (no manifest.json); run stage=all there"
        )
    cs = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(cs):
        cs.paths.output_dir = str(src)
        cs.model.backbone = str(cfg.transfer.source_backbone)
        cs.model.backbone_args = {}
        cs.transfer["from"] = None
        cs.search.resume = None
    src.mkdir(parents=True, exist_ok=True)
    log.info("stage=all: searching the transfer source in %s (backbone %s)", src, cs.model.backbone)
    from .loggers import scope_prefix

    with scope_prefix("transfer_source"):
        run_search_or_resume(cs, prepared)
    return {"source": str(src), "searched": True}


def setup_process(cfg: DictConfig) -> None:
    """This process's CPU runtime, once the config is checked: torch threads, malloc thresholds."""
    from .allocator import apply as apply_malloc
    from .threads import apply as apply_threads

    apply_threads(cfg)
    apply_malloc(cfg)


def run(cfg: DictConfig) -> dict[str, Any]:
    from .loggers import run_scope, scope_prefix
    from .rundir import output_dir, prepared_dir
    from .validate import check_config

    check_config(cfg)  # every key every stage of this run will use, before any work
    setup_process(cfg)
    phases = method.phases(cfg)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    from .distributed import barrier, is_global_zero
    from .serving import save_run_config

    # trainer=ddp: every rank runs this function (Lightning's launcher starts the other ranks at the
    # first fit and they re-run the command); all ranks take part in the fits, rank 0 alone writes the
    # run dir and runs the stages that do not train (the others wait at a barrier)
    zero = is_global_zero()
    if zero:
        save_run_config(cfg, out)  # what stage=predict rebuilds the run's models from
        (out / "error.txt").unlink(missing_ok=True)  # a previous failure of this run dir (multirun jobs)
    status: dict[str, Any] = {"run_dir": str(out.resolve()), "stages": {}}

    def rank_zero_stage(name: str):
        if zero:
            res = stage_module(name).run(cfg)
            barrier()
            return res
        barrier()  # rank 0 runs it; its outputs exist after the barrier
        return {}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        res = fn()
        status["stages"][name] = {"seconds": round(time.perf_counter() - t0, 3)}
        log.info("stage=all: %s done in %.1f s", name, status["stages"][name]["seconds"])
        if zero:
            write_json(out / "pipeline.json", status)
        return res

    with run_scope(cfg, str(cfg.tag)):
        prepared = timed("prepare", lambda: prepared_dir(cfg))
        from .data.feature_map import FeatureMap
        from .validate import check_against_data

        check_against_data(cfg, FeatureMap.load(prepared), phases)
        cb = base_config(cfg) if bool(cfg.stage.train_base) and method.has_selector(cfg) else None
        # the search's pretraining is Base's fit (same weights to the last bit): Base is taken from it
        derive = cb is not None and "search" in phases and stage_module("search").pretraining_is_base(cfg, cb)
        if cb is not None and not derive:
            with scope_prefix("base"):
                timed("base", lambda: run_search_or_resume(cb, prepared))
        if method.transferring(cfg):
            timed("transfer_source", lambda: transfer_source(cfg, prepared))
        metrics: dict[str, Any] = {}
        for name in phases:
            if name == "search":
                with scope_prefix("search"):
                    metrics = timed("search", lambda: run_search_or_resume(cfg, prepared))
                if derive:
                    searched = out / stage_module("search").SEARCH_DIR
                    with scope_prefix("base"):
                        timed("base", lambda s=searched: run_search_or_resume(cb, prepared, derive_from=s))
            elif name in FIT_STAGES:
                metrics = timed(name, lambda name=name: stage_module(name).run(cfg))
            else:
                metrics = timed(name, lambda name=name: rank_zero_stage(name))
    status["total_seconds"] = round(sum(s["seconds"] for s in status["stages"].values()), 3)
    if zero:
        write_json(out / "pipeline.json", status)
    log.info("stage=all: finished in %.1f s; results in %s", status["total_seconds"], out / "evaluate")
    return metrics


def run_stage(cfg: DictConfig) -> dict[str, Any]:
    """Run ``stage.name``: one stage, or ``all`` (this module)."""
    from .validate import check_config

    if str(cfg.stage.name) == "all":
        return run(cfg)  # checks the config and sets up the process itself
    check_config(cfg)  # every key the stage will use, before any work
    setup_process(cfg)
    return stage_module(str(cfg.stage.name)).run(cfg)
