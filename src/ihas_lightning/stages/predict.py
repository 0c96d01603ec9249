"""Stage ``predict``: score new rows with a finished run's model.

    python -m ihas_lightning stage=predict predict.run=<run dir> predict.input=<file(s)> \\
        predict.output=preds.parquet

* The run dir is one that ``stage=all`` finished (any method: Base, iHAS, the baselines); its
  ``config.yaml`` says which dataset, method and models it holds (:mod:`ihas_lightning.serving`).
* **Raw input** (Criteo ``.txt`` / Avazu ``.csv``, plain or ``.gz``) is parsed exactly as ``prepare``
  parses it (same transforms, same bad-row policy: ``predict.on_bad_rows``) and encoded with the run's
  saved vocabulary (``vocab.parquet``: unseen values map to the field's OOV id). The label column may
  be absent (new traffic). **Parquet input** holds the prepared columns (e.g. a prepared split).
* It streams: one block of raw rows (``predict.block_size_mb``) at a time, scored in batches of
  ``predict.batch_size`` and written as one row group, so memory does not grow with the input.
* Output (Parquet, written to a temp file and renamed when complete): ``line`` (the row's line in its
  file; the row index for Parquet input), ``probability`` (float32), ``cluster`` (routed iHAS: the
  cluster whose model scored the row), ``label`` when the input has labels, and the passthrough column
  (Avazu's ``id`` by default). With labels it also reports AUC and logloss.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig

from ..errors import ConfigError, DataError
from ..utils import write_json

log = logging.getLogger("ihas_lightning")

MODELS = ("final", "base", "search")


def _inputs(cfg: DictConfig) -> list[Path]:
    raw = cfg.predict.get("input")
    items = list(raw) if isinstance(raw, (list, tuple, ListConfig)) else [raw]
    if not items or any(i in (None, "") for i in items):
        raise ConfigError(
            "config key 'predict.input': the file(s) to score (raw Criteo/Avazu rows or .parquet)"
        )
    return [Path(str(i)) for i in items]


def check_cfg(cfg: DictConfig) -> None:
    p = cfg.predict
    if p.get("run") in (None, ""):
        raise ConfigError("config key 'predict.run': the run dir of a finished stage=all")
    _inputs(cfg)
    if p.model not in MODELS:
        raise ConfigError(f"config key 'predict.model': must be one of {list(MODELS)} (got {p.model!r})")
    from ..serving import ROUTINGS

    if p.routing not in ROUTINGS:
        raise ConfigError(
            f"config key 'predict.routing': must be one of {list(ROUTINGS)} (got {p.routing!r})"
        )
    if p.batch_size < 1:
        raise ConfigError(f"config key 'predict.batch_size': must be an integer >= 1 (got {p.batch_size})")
    if p.on_bad_rows not in ("fail", "skip"):
        raise ConfigError(f"config key 'predict.on_bad_rows': must be fail or skip (got {p.on_bad_rows!r})")
    if not p.block_size_mb > 0:
        raise ConfigError(f"config key 'predict.block_size_mb': must be > 0 (got {p.block_size_mb})")
    out = p.get("output")
    if out and not str(out).endswith(".parquet"):
        raise ConfigError(f"config key 'predict.output': a .parquet file (got {out!r})")


class Scorer:
    """One of the run's models as ``x int32 [B, F] -> (logits float32 [B], clusters or None)``."""

    def __init__(self, rm: Any, which: str, batch_size: int, routing: str = "exact"):
        self.name, fn, _, _ = rm.entry(which)
        self.routed = rm.routed_model(routing) if fn is rm.routed else None
        if self.routed is not None and routing == "fast":
            self.name = f"{self.name} (fast routing)"
        self.fn, self.batch_size = fn, int(batch_size)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        logits, clusters = [], []
        for i in range(0, len(x), self.batch_size):
            xb = x[i : i + self.batch_size]
            if self.routed is not None:
                lg, cl = self.routed.forward_with_clusters(xb)
                clusters.append(cl.to(torch.int32).numpy())
            else:
                lg = self.fn(xb)
            logits.append(lg.float().numpy())
        p = np.concatenate(logits) if logits else np.zeros(0, dtype=np.float32)
        c = (np.concatenate(clusters) if clusters else np.zeros(0, dtype=np.int32)) if self.routed else None
        return p, c


def _raw_blocks(path: Path, rcfg: DictConfig, fmap: Any, encoders: list, cfg: DictConfig,
                stats: dict[str, Any]) -> Iterator[tuple[torch.Tensor, np.ndarray, np.ndarray, dict]]:  # fmt: skip
    """(x, labels or -1, line numbers, passthrough columns) per block of a raw file."""
    from ..data.raw_blocks import BadRows, iter_blocks
    from ..data.raw_format import make_format, sniff
    from ..data.raw_io import check_path

    base = make_format(rcfg.dataset)
    if list(base.fields) != list(fmap.field_names):
        raise DataError(f"{path}: the run's fields differ from what a {base.name} file yields")
    check_path(path, "predict.input")
    f = sniff(path, base, label_optional=True)
    pt = cfg.predict.get("passthrough")
    if pt == "auto":
        pt = "id" if f.name == "avazu" and "id" in f.columns else None
    if pt is not None:
        if f.name == "criteo" or pt not in f.columns:
            raise ConfigError(f"config key 'predict.passthrough': {path} has no column {pt!r}")
        f.passthrough = (str(pt),)
    bad = BadRows()
    bs = int(float(cfg.predict.block_size_mb) * (1 << 20))
    for blk in iter_blocks(path, f, bs, str(cfg.predict.on_bad_rows), bad):
        x = np.empty((blk.n, len(encoders)), dtype=np.int32)
        for j, (enc, k) in enumerate(zip(encoders, blk.keys)):
            x[:, j] = enc(k)
        yield torch.from_numpy(x), blk.label, blk.line, blk.extra
    stats["skipped_rows"] = stats.get("skipped_rows", 0) + bad.count
    stats["blank_lines"] = stats.get("blank_lines", 0) + bad.blank


def _parquet_blocks(path: Path, fmap: Any) -> Iterator[tuple[torch.Tensor, np.ndarray, np.ndarray, dict]]:
    import pyarrow.parquet as pq

    from ..data.feature_map import LABEL

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    names = set(pf.schema_arrow.names)
    missing = [n for n in fmap.field_names if n not in names]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (the run's fields: {', '.join(fmap.field_names)})")
    start = 0
    for rg in range(pf.num_row_groups):
        t = pf.read_row_group(rg)
        x = np.empty((t.num_rows, len(fmap.field_names)), dtype=np.int32)
        for j, (name, vocab) in enumerate(zip(fmap.field_names, fmap.vocab_sizes)):
            col = t.column(name).to_numpy()
            if len(col) and (col.min() < 0 or col.max() >= vocab):
                raise DataError(f"{path}: column {name!r} has ids outside the run's vocabulary [0, {vocab})")
            x[:, j] = col
        y = t.column(LABEL).to_numpy().astype(np.int8) if LABEL in names else np.full(t.num_rows, -1, np.int8)
        yield torch.from_numpy(x), y, np.arange(start, start + t.num_rows, dtype=np.int64), {}
        start += t.num_rows


def run(cfg: DictConfig) -> dict[str, Any]:
    from ..data.vocab import load_encoders
    from ..serving import choose_routing, load_run_config, load_run_models

    check_cfg(cfg)
    run_dir = Path(str(cfg.predict.run))
    inputs = _inputs(cfg)
    for p in inputs:
        if not p.is_file():
            raise DataError(f"{p}: no such file (given as predict.input)")
    rcfg = load_run_config(run_dir)
    t0 = time.perf_counter()
    rm = load_run_models(rcfg)
    routing, why = choose_routing(run_dir, str(cfg.predict.routing), rm, str(cfg.predict.model))
    if cfg.predict.routing == "auto":
        log.info("predict: routing=auto -> %s: %s", routing, why)
    scorer = Scorer(rm, str(cfg.predict.model), int(cfg.predict.batch_size), routing)
    raw = [p for p in inputs if not p.name.endswith(".parquet")]
    encoders = load_encoders(rm.prepared, rm.fmap) if raw else None
    out = Path(str(cfg.predict.output or run_dir / "predict" / f"{inputs[0].name.split('.')[0]}.parquet"))
    out.parent.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {}
    t1 = time.perf_counter()
    blocks = _all_blocks(cfg, inputs, rcfg, rm, encoders, stats)
    rows, labeled = _write_scores(out, blocks, scorer, multi=len(inputs) > 1, first=inputs[0])
    seconds = time.perf_counter() - t1
    summary: dict[str, Any] = {
        "run": str(run_dir.resolve()),
        "model": scorer.name,
        "routed": scorer.routed is not None,
        "inputs": [str(p) for p in inputs],
        "output": str(out.resolve()),
        "rows": rows,
        **stats,
        "load_seconds": round(t1 - t0, 3),
        "seconds": round(seconds, 3),
        "rows_per_second": round(rows / max(seconds, 1e-9), 1),
    }
    _report(summary, labeled, out, scorer.name, seconds)
    return {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _all_blocks(cfg: DictConfig, inputs: list[Path], rcfg, rm, encoders, stats: dict[str, Any]):
    """(file name, ids, labels, line numbers, extra columns) of every input's blocks, in order, with a
    progress line per file."""
    from ..data.prepare import rows_progress

    with rows_progress(bool(cfg.predict.progress)) as prog:
        for path in inputs:
            task = prog.add_task(f"predict {path.name}", total=None)
            blocks = (
                _parquet_blocks(path, rm.fmap)
                if path.name.endswith(".parquet")
                else _raw_blocks(path, rcfg, rm.fmap, encoders, cfg, stats)
            )
            for x, y, line, extra in blocks:
                yield path.name, x, y, line, extra
                prog.update(task, advance=len(line))


def _write_scores(out: Path, blocks, scorer, multi: bool, first: Path):
    """Score ``blocks`` into ``out`` (Parquet: [file,] line, probability, [cluster,] label, extras),
    written to a temporary file and renamed when complete: (rows, (logits, labels) of labeled rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    logits_all, labels_all = [], []
    writer = None
    rows = 0
    try:
        for name, x, y, line, extra in blocks:
            lg, c = scorer(x)
            p = torch.sigmoid(torch.from_numpy(lg)).numpy()
            cols: dict[str, Any] = {"line": pa.array(line, pa.int64()), "probability": pa.array(p)}
            if multi:
                cols = {"file": pa.array([name] * len(p), pa.string()), **cols}
            if c is not None:
                cols["cluster"] = pa.array(c)
            has_label = bool(len(y)) and y[0] >= 0
            cols["label"] = pa.array(np.where(y >= 0, y, 0).astype(np.int8), mask=y < 0)
            cols.update(extra)
            table = pa.table(cols)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            elif table.schema != writer.schema:
                table = table.cast(writer.schema)
            writer.write_table(table)
            if has_label:
                logits_all.append(lg)
                labels_all.append(y)
            rows += len(p)
        if writer is None:
            raise DataError(f"{first}: no rows to score")
        writer.close()
        writer = None
        os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return rows, (logits_all, labels_all)


def _report(summary: dict[str, Any], labeled, out: Path, name: str, seconds: float) -> None:
    """AUC / logloss over the labeled rows, the summary JSON beside the output, one printed line."""
    from ..serving import auc_logloss

    logits_all, labels_all = labeled
    if labels_all:
        y = torch.from_numpy(np.concatenate(labels_all).astype(np.float32))
        auc, ll = auc_logloss(torch.from_numpy(np.concatenate(logits_all)), y)
        summary.update(labeled_rows=len(y), auc=auc, logloss=ll)
    write_json(out.with_suffix(".json"), summary)
    msg = f"predict: {summary['rows']:,} rows scored by {name} in {seconds:.1f} s -> {out}"
    if labels_all:
        msg += f" (AUC {summary['auc']:.4f}, logloss {summary['logloss']:.4f} on {summary['labeled_rows']:,} labeled rows)"
    print(msg, flush=True)


__all__ = ["MODELS", "Scorer", "check_cfg", "run"]
