"""Stage ``export``: a self-contained serving artifact of a finished run.

    python -m ihas_lightning stage=export export.run=<run dir> [export.dir=<dir>]

The artifact dir (written to a temp dir and renamed when complete) holds:

* ``model.onnx`` -- the model as an ONNX graph (``torch.onnx.export``, the dynamo exporter), checked
  with ``onnxruntime``; ``model.pt2`` -- the same as a ``torch.export`` program (``torch.export.load``,
  no need for this package). Input ``x``: int64 ``[batch, fields]``, the ids of
  ``vocab.parquet``; outputs ``probability`` (float32 ``[batch]``) and ``cluster`` (int64 ``[batch]``:
  the cluster whose model scored the row; 0 for a model that does not route). For iHAS the graph is
  the routed set: searched embedding + gate (deterministic threshold) -> nearest centroid -> every
  cluster model, each row taking its own cluster's output.
* ``vocab.parquet`` -- ``field, token, id, key``: the raw token (the string; for Criteo's numeric
  fields the transformed integer, ``floor(ln(x)^2)`` for ``x > 2``; null = missing / empty) and its id;
  tokens not listed get id 0. ``key`` is the 64-bit key of ``prepare`` (``token`` is null for a
  hashed token longer than 8 bytes).
* ``manifest.json`` -- fields (order, vocab sizes, kinds), the raw format and transforms, the model
  row, the inputs and outputs, the source run's config hash, torch / onnx versions and the parity
  check: every exported format against the Python model on the prepared test split (max absolute
  probability difference <= ``export.tolerance`` and identical clusters, or the export fails).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from ..errors import ConfigError, DataError
from ..utils import atomic_dir, stable_hash, write_json

log = logging.getLogger("ihas_lightning")

MODELS = ("final", "base", "search")
FORMATS = ("onnx", "pt2")


def check_cfg(cfg: DictConfig) -> None:
    e = cfg.export
    if e.get("run") in (None, ""):
        raise ConfigError("config key 'export.run': the run dir of a finished stage=all")
    if e.model not in MODELS:
        raise ConfigError(f"config key 'export.model': must be one of {list(MODELS)} (got {e.model!r})")
    from ..serving import ROUTINGS

    if e.routing not in ROUTINGS:
        raise ConfigError(f"config key 'export.routing': must be one of {list(ROUTINGS)} (got {e.routing!r})")
    if not e.formats or any(f not in FORMATS for f in e.formats):
        raise ConfigError(
            f"config key 'export.formats': a non-empty list of {list(FORMATS)} (got {list(e.formats)})"
        )
    if not 13 <= int(e.opset) <= 23:
        raise ConfigError(f"config key 'export.opset': must be in [13, 23] (got {e.opset})")
    if not e.tolerance > 0:
        raise ConfigError(f"config key 'export.tolerance': must be > 0 (got {e.tolerance})")


def token_table(prepared: Path, fmap: Any) -> Any:
    """``vocab.parquet`` with each key's raw token spelled out (what a service without this package
    looks a raw value up in)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..data.tokens import numeric_key_to_token
    from ..data.vocab import VOCAB_FILE

    path = prepared / VOCAB_FILE
    if not path.is_file():
        raise DataError(f"{path}: no saved vocabulary (a synthetic dataset has no raw tokens to serve)")
    t = pq.read_table(path)
    fields = t.column("field").to_pylist()
    keys = t.column("key").to_numpy()
    kinds = {f.name: f.kind for f in fmap.fields}
    tokens: list[str | None] = []
    for name, key in zip(fields, keys.tolist()):
        if key == 0:  # a missing / empty value (every kind): its own id
            tokens.append(None)
        elif kinds.get(name) == "numeric" or name in ("hour_of_day", "weekday"):
            v = numeric_key_to_token(key)
            tokens.append(None if v is None else str(v))
        else:
            tokens.append(_spelled(key))
    return pa.table({"field": pa.array(fields, pa.string()), "token": pa.array(tokens, pa.string()),
                     "id": t.column("id"), "key": t.column("key")})  # fmt: skip


def _spelled(key: int) -> str | None:
    """The token a packed key spells: prepare packs a token of <= 8 bytes into its key (zero padded);
    a longer token is hashed and has no spelling (None). A hash that happens to look like printable
    ASCII + zero padding (p ~ 3e-4 per long token; Criteo and Avazu tokens are <= 8 bytes) is spelled
    as that garbage string, which no raw value matches: such a token serves as unseen (id 0)."""
    from ..data.tokens import key_to_token

    body = int(key).to_bytes(8, "big").rstrip(b"\x00")
    return key_to_token(key) if body and all(0x20 <= b < 0x7F for b in body) else None


def _test_inputs(rm: Any) -> torch.Tensor:
    import pyarrow.parquet as pq

    t = pq.read_table(rm.prepared / "test.parquet", columns=list(rm.fmap.field_names))
    return torch.from_numpy(
        np.stack([t.column(n).to_numpy() for n in rm.fmap.field_names], 1).astype(np.int64)
    )


def parity(
    name: str, got: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray], tol: float
) -> dict:
    diff = float(np.abs(np.asarray(got[0], np.float64) - ref[0]).max()) if len(ref[0]) else 0.0
    agree = float((np.asarray(got[1]) == ref[1]).mean()) if len(ref[1]) else 1.0
    res = {
        "max_abs_diff": diff,
        "cluster_agreement": agree,
        "rows": len(ref[0]),
        "ok": diff <= tol and agree == 1.0,
    }
    if not res["ok"]:
        raise DataError(f"export: the {name} artifact differs from the Python model on the test split "
                        f"(max |dp| {diff:.2e} > export.tolerance {tol:g} or clusters agree {agree:.4f})")  # fmt: skip
    return res


def run(cfg: DictConfig) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from ..serving import choose_routing, load_run_config, load_run_models

    check_cfg(cfg)
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "torch._dynamo", "torch.export"):
        # pass-by-pass INFO lines and "torchvision is not installed" notes (the log file too)
        logging.getLogger(noisy).setLevel(logging.ERROR)
    e = cfg.export
    run_dir = Path(str(e.run))
    rcfg = load_run_config(run_dir)
    rm = load_run_models(rcfg)
    name = rm.entry(str(e.model))[0]
    routing, why = choose_routing(run_dir, str(e.routing), rm, str(e.model))
    if e.routing == "auto":
        log.info("export: routing=auto -> %s: %s", routing, why)
    module = rm.serving_module(str(e.model), routing).eval()
    final = Path(str(e.dir or run_dir / "export"))
    if final.exists() and not e.overwrite:
        raise DataError(f"{final}: an artifact is already there; set export.overwrite=true to replace it")
    x = _test_inputs(rm)
    with torch.inference_mode():
        p, c = module(x)
    ref = (p.numpy().astype(np.float64), c.numpy())
    t0 = time.perf_counter()
    with atomic_dir(final, overwrite=bool(e.overwrite)) as tmp:
        formats = _export_formats(e, module, x, ref, tmp)
        has_vocab = (rm.prepared / "vocab.parquet").is_file()
        if has_vocab:
            pq.write_table(token_table(rm.prepared, rm.fmap), tmp / "vocab.parquet")
        shutil.copy2(rm.prepared / "feature_map.json", tmp / "feature_map.json")
        manifest = _manifest(rm, rcfg, module, name, why, has_vocab, run_dir, formats)
        write_json(tmp / "manifest.json", manifest)
    secs = time.perf_counter() - t0
    checks = ", ".join(f"{k} max |dp| {v['max_abs_diff']:.1e}" for k, v in formats.items())
    print(f"export: {name} -> {final} ({checks}; {len(x):,} test rows; {secs:.1f} s)", flush=True)
    return {f"export/{k}/max_abs_diff": v["max_abs_diff"] for k, v in formats.items()}


def _export_formats(e, module, x: torch.Tensor, ref, tmp: Path) -> dict[str, Any]:
    """``module`` exported in each of ``export.formats`` (pt2, onnx) into ``tmp``, each one reloaded and
    checked against the eager outputs ``ref`` on the test rows ``x``."""
    example = (x[: min(len(x), 8)],)
    formats: dict[str, Any] = {}
    if "pt2" in e.formats:
        ep = torch.export.export(module, example, dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(ep, str(tmp / "model.pt2"))
        loaded = torch.export.load(str(tmp / "model.pt2")).module()
        with torch.inference_mode():
            got = loaded(x)
        formats["pt2"] = {
            "file": "model.pt2",
            **parity("pt2", (got[0].numpy(), got[1].numpy()), ref, e.tolerance),
        }
    if "onnx" in e.formats:
        import onnxruntime as ort

        torch.onnx.export(module, example, str(tmp / "model.onnx"), input_names=["x"],
                          output_names=["probability", "cluster"], opset_version=int(e.opset),
                          dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
                          external_data=False)  # fmt: skip
        sess = ort.InferenceSession(str(tmp / "model.onnx"), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"x": x.numpy()})
        formats["onnx"] = {"file": "model.onnx", "opset": int(e.opset),
                           **parity("onnx", (got[0], got[1]), ref, e.tolerance)}  # fmt: skip
    return formats


def _manifest(
    rm, rcfg, module, name: str, why: str, has_vocab: bool, run_dir: Path, formats
) -> dict[str, Any]:
    """The artifact's manifest: the model, its routing, the input and outputs, the fields and their
    vocabulary, the source run and the versions."""
    routed = module.routed is not None
    manifest = {
        "model": name,
        "method": str(rcfg.method.name),
        "routed": routed,
        "routing": ("fast (distilled router)" if module.routed.fast else "exact") if module.routed else None,
        "routing_reason": why if routed else None,  # routing=auto: why this one
        "clusters": int(rm.k) if routed else 1,
        "input": {
            "name": "x",
            "dtype": "int64",
            "shape": ["batch", rm.fmap.num_fields],
            "meaning": "per field, the id of the row's token in vocab.parquet (0: not listed)",
        },  # fmt: skip
        "outputs": [
            {"name": "probability", "dtype": "float32", "shape": ["batch"]},
            {"name": "cluster", "dtype": "int64", "shape": ["batch"]},
        ],  # fmt: skip
        "fields": [{"name": f.name, "vocab_size": f.vocab_size, "kind": f.kind} for f in rm.fmap.fields],
        "format": rm.fmap.extra.get("format", rm.fmap.dataset),
        "transforms": rm.fmap.transforms,
        "vocab": "vocab.parquet" if has_vocab else None,
        "source_run": str(run_dir.resolve()),
        "source_config_hash": stable_hash(dict(rcfg)),
        "formats": formats,
        "torch": torch.__version__,
    }
    try:
        import onnx

        manifest["onnx"] = onnx.__version__
    except ImportError:  # pragma: no cover - onnx comes with the serve extra
        pass
    return manifest


__all__ = ["FORMATS", "MODELS", "check_cfg", "parity", "run", "token_table"]
