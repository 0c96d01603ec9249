"""The prepared dataset directory of a config (Parquet splits + feature map), built when needed.

``ensure_prepared(cfg)`` is what every stage (prepare, search, cluster, retrain, evaluate) calls
first. It resolves ``dataset.*`` to a prepared directory:

* ``dataset.format=synthetic`` -> the planted dataset is generated (once) by
  :func:`ihas_lightning.data.synthetic.generate_synthetic`;
* raw files given (``dataset.raw_path`` or ``dataset.train_path/val_path/test_path``) -> the
  paper's preprocessing (:mod:`ihas_lightning.data.prepare`) runs, or a previous output is reused;
* only ``dataset.prepared_dir`` -> that directory is used as is.

Outputs are built in a temporary sibling directory and renamed into place (``utils.atomic_dir``),
so a half-written directory never passes for complete. Each output records a hash of the
config values that shape it and of the input files' identity (size + mtime): a matching output
is reused, a different one is an error unless ``prepare.overwrite=true``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError, DataError, require
from ..utils import atomic_dir, file_identity, stable_hash
from .feature_map import LABEL, SPLITS, FeatureMap, is_complete

log = logging.getLogger(__name__)

PREPARE_VERSION = 1
RAW_FORMATS = ("criteo", "avazu")


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def _container(node: Any) -> Any:
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _get(d: Any, key: str, default: Any = None) -> Any:
    try:
        v = d.get(key, default)
    except Exception:  # noqa: BLE001 - an interpolation that cannot resolve
        return default
    return default if v is None else v


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def raw_files(dcfg: Any) -> dict[str, Path] | None:
    """The raw inputs named by the config: {'raw': p}, {'train','val','test'}, or None."""
    raw = _get(dcfg, "raw_path")
    explicit = {s: _get(dcfg, f"{s}_path") for s in SPLITS}
    given = {s: p for s, p in explicit.items() if p not in (None, "")}
    if raw not in (None, "") and given:
        raise ConfigError(
            "config keys 'dataset.raw_path' and 'dataset.train_path/val_path/test_path': give either one raw "
            f"file (split at random) or the three split files, not both (got raw_path and {sorted(given)})"
        )
    if raw not in (None, ""):
        return {"raw": Path(str(raw)).expanduser()}
    if given:
        missing = [f"dataset.{s}_path" for s in SPLITS if s not in given]
        if missing:
            raise ConfigError(
                f"config key '{missing[0]}': explicit split files need all three of "
                f"dataset.train_path, dataset.val_path and dataset.test_path (missing {', '.join(missing)})"
            )
        return {s: Path(str(given[s])).expanduser() for s in SPLITS}
    return None


#: keys every format accepts without its yaml setting them (read where the data is loaded)
COMMON_KEYS = ("device_resident", "loader_mode", "memory_budget_gb")


def dataset_keys(fmt: str) -> set[str]:
    """The ``dataset.*`` keys of a format: those its options in ``conf/dataset/`` set (the dataset group
    is open in the schema because each format has its own keys)."""
    from ..config import CONFIG_DIR

    keys: set[str] = set(COMMON_KEYS)
    for f in sorted((CONFIG_DIR / "dataset").glob("*.yaml")):
        node = OmegaConf.load(f).get("dataset") or {}
        if node.get("format") == fmt:
            keys |= set(node.keys())
    return keys


def validate_config(cfg: DictConfig) -> None:
    """Check dataset.* and prepare.* values; raise ConfigError naming the key."""
    d, p = cfg.dataset, cfg.get("prepare", {})
    fmt = _get(d, "format")
    require(fmt in (*RAW_FORMATS, "synthetic"), "dataset.format",
            f"must be one of criteo, avazu, synthetic (got {fmt!r})")  # fmt: skip
    known = dataset_keys(str(fmt))
    extra = [k for k in d.keys() if k not in known] if known else []
    require(not extra, f"dataset.{extra[0] if extra else ''}",
            f"no such key for a {fmt} dataset (its keys: {', '.join(sorted(known))})")  # fmt: skip
    dr = _get(d, "device_resident", None)
    require(dr is None or isinstance(dr, bool), "dataset.device_resident",
            f"must be true, false or null (null: on when trainer.accelerator is a GPU; got {dr!r})")  # fmt: skip
    lm = _get(d, "loader_mode", None)
    require(lm is None or lm in ("auto", "in_memory", "streaming"), "dataset.loader_mode",
            f"must be auto, in_memory or streaming (got {lm!r})")  # fmt: skip
    mb = _get(d, "memory_budget_gb", None)
    require(mb is None or (isinstance(mb, int | float) and not isinstance(mb, bool) and mb > 0),
            "dataset.memory_budget_gb", f"must be a number > 0 (got {mb!r})")  # fmt: skip
    split = _container(_get(d, "split", [0.8, 0.1, 0.1]))
    ok = isinstance(split, list | tuple) and len(split) == 3
    ok = ok and all(isinstance(x, int | float) and not isinstance(x, bool) and x >= 0 for x in split)
    require(ok, "dataset.split", f"must be three non-negative fractions [train, val, test] (got {split})")
    require(
        abs(sum(split) - 1.0) < 1e-6,
        "dataset.split",
        f"fractions must sum to 1 (got {split}, sum {sum(split):g})",
    )
    require(split[0] > 0, "dataset.split", f"the train fraction must be > 0 (got {split})")
    rgs = _get(d, "row_group_size", 131072)
    require(_is_int(rgs) and rgs >= 1, "dataset.row_group_size", f"must be an integer >= 1 (got {rgs!r})")
    mc = _container(_get(d, "min_count", 1))
    if isinstance(mc, Mapping):
        for k, v in mc.items():
            require(_is_int(v) and v >= 1, f"dataset.min_count.{k}", f"must be an integer >= 1 (got {v!r})")
    else:
        require(_is_int(mc) and mc >= 1, "dataset.min_count", f"must be an integer >= 1 (got {mc!r})")
    if fmt in RAW_FORMATS:
        seed = _get(d, "split_seed", 0)
        require(_is_int(seed), "dataset.split_seed", f"must be an integer (got {seed!r})")
        if fmt == "criteo":
            from .raw_format import CRITEO_CAT, CRITEO_INT, NUMERIC_TRANSFORMS

            nt = _get(d, "numeric_transform", "log_square")
            require(nt in NUMERIC_TRANSFORMS, "dataset.numeric_transform",
                    f"must be one of {', '.join(NUMERIC_TRANSFORMS)} (got {nt!r})")  # fmt: skip
            names = set(CRITEO_INT + CRITEO_CAT)
        else:
            from .raw_format import AVAZU_FIELDS, HOUR_TRANSFORMS

            ht = _get(d, "hour_transform", "raw")
            require(ht in HOUR_TRANSFORMS, "dataset.hour_transform",
                    f"must be one of {', '.join(HOUR_TRANSFORMS)} (got {ht!r})")  # fmt: skip
            names = set(AVAZU_FIELDS) | {"hour_of_day", "weekday"}
        if isinstance(mc, Mapping):
            unknown = sorted(set(mc) - names - {"default"})
            require(not unknown, "dataset.min_count",
                    f"unknown field(s) {unknown} (use field names or 'default')")  # fmt: skip
        raw_files(d)
    mode = _get(p, "on_bad_rows", "fail")
    require(mode in ("fail", "skip"), "prepare.on_bad_rows", f"must be fail or skip (got {mode!r})")
    bsz = _get(p, "block_size_mb", 16)
    require(isinstance(bsz, int | float) and not isinstance(bsz, bool) and bsz > 0, "prepare.block_size_mb",
            f"must be a positive number (got {bsz!r})")  # fmt: skip
    require(isinstance(_get(p, "overwrite", False), bool), "prepare.overwrite", "must be true or false")
    pd = _get(d, "prepared_dir")
    require(pd not in (None, ""), "dataset.prepared_dir", "must be set (where the prepared dataset lives)")


def config_hash(cfg: DictConfig) -> str:
    """Hash of the config values that shape the prepared output (not prepared_dir, not block size)."""
    d = cfg.dataset
    fmt = d.format
    if fmt == "synthetic":
        values = {k: v for k, v in _container(d).items() if k not in ("prepared_dir", "name", *COMMON_KEYS)}
        return stable_hash({"synthetic": values})
    files = raw_files(d) or {}
    values: dict[str, Any] = {
        "prepare_version": PREPARE_VERSION,
        "format": fmt,
        "mode": "single" if "raw" in files else "explicit",
        "min_count": _container(_get(d, "min_count", 1)),
        "row_group_size": int(_get(d, "row_group_size", 131072)),
        "on_bad_rows": _get(cfg.get("prepare", {}), "on_bad_rows", "fail"),
    }
    if "raw" in files:
        values["split"] = [float(x) for x in _container(d.split)]
        values["split_seed"] = int(_get(d, "split_seed", 0))
    if fmt == "criteo":
        values["numeric_transform"] = _get(d, "numeric_transform", "log_square")
    if fmt == "avazu":
        values["hour_transform"] = _get(d, "hour_transform", "raw")
    return stable_hash(values)


def input_hash(files: Mapping[str, Path]) -> str:
    """Hash of the raw inputs' identity (resolved path, size, mtime), not their content."""
    return stable_hash({role: file_identity(p) for role, p in files.items()})


# ---------------------------------------------------------------------------------------------
# ensure_prepared
# ---------------------------------------------------------------------------------------------
def _check_loadable(path: Path, fmt: str | None = None) -> FeatureMap:
    """Load the feature map and check that the split files carry its columns."""
    import pyarrow.parquet as pq

    fm = FeatureMap.load(path)
    have_fmt = fm.extra.get("format")
    if fmt is not None and have_fmt is not None and have_fmt != fmt:
        raise ConfigError(
            f"config key 'dataset.prepared_dir': {path} holds a prepared '{have_fmt}' dataset but "
            f"dataset.format={fmt}"
        )
    want = [*fm.field_names, LABEL]
    for s in SPLITS:
        f = path / f"{s}.parquet"
        try:
            names = pq.read_schema(f).names
        except Exception as e:  # noqa: BLE001 - any unreadable file is a data error
            raise DataError(f"{f}: not a readable Parquet file ({' '.join(str(e).split())[:200]})") from e
        missing = [c for c in want if c not in names]
        if missing:
            raise DataError(f"{f}: missing column(s) {missing[:5]} listed in its feature map")
    return fm


def _mismatch_error(final: Path, what: str) -> ConfigError:
    return ConfigError(
        f"config key 'dataset.prepared_dir': {final} already holds a dataset prepared from a different {what}; "
        "set prepare.overwrite=true to rebuild it, or choose another dataset.prepared_dir"
    )


def _reuse_or_check(final: Path, chash: str, ihash: str | None, overwrite: bool) -> bool:
    """True when ``final`` is complete with matching hashes (reuse it)."""
    if is_complete(final):
        fm = FeatureMap.load(final)
        if fm.config_hash == chash and (ihash is None or fm.input_hash == ihash):
            return True
        if not overwrite:
            what = "config" if fm.config_hash != chash else "input file (size/mtime changed)"
            raise _mismatch_error(final, what)
        log.info("prepare.overwrite=true: rebuilding %s", final)
        return False
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not overwrite:
        raise ConfigError(
            f"config key 'dataset.prepared_dir': {final} exists but is not a complete prepared dataset; "
            "remove it or set prepare.overwrite=true"
        )
    return False


def _build(final: Path, chash: str, ihash: str | None, build) -> None:
    """Run ``build(tmp_dir)`` inside an atomic sibling directory renamed to ``final``. Under trainer=ddp
    started by srun / torchrun (every rank runs the command from the start) only global rank 0 builds;
    the other ranks wait for its output."""
    from ..distributed import is_global_zero

    if not is_global_zero():
        import time

        log.info("waiting for rank 0 to prepare %s", final)
        while True:
            try:
                if is_complete(final) and _reuse_or_check(final, chash, ihash, overwrite=False):
                    return
            except ConfigError:  # an older dataset there, which rank 0 is replacing
                pass
            time.sleep(2.0)
    replace = final.exists()
    try:
        with atomic_dir(final, overwrite=replace) as tmp:
            build(tmp)
    except FileExistsError:
        # another process finished the same output while we were building: reuse it if it matches
        if _reuse_or_check(final, chash, ihash, overwrite=False):
            log.info("reusing %s (written concurrently by another process)", final)
            return
        raise


def _synthetic(cfg: DictConfig, final: Path, overwrite: bool) -> Path:
    chash = config_hash(cfg)
    if _reuse_or_check(final, chash, None, overwrite):
        log.info("reusing prepared synthetic dataset %s (config hash %s)", final, chash)
        return final
    try:
        from .synthetic import generate_synthetic
    except ImportError as e:
        raise ConfigError(
            f"config key 'dataset.format': the synthetic generator is not available ({e})"
        ) from e

    def build(tmp: Path) -> None:
        fm = generate_synthetic(cfg.dataset, tmp)
        if not isinstance(fm, FeatureMap):
            fm = FeatureMap.load(tmp)
        fm.config_hash = chash
        fm.extra.setdefault("format", "synthetic")
        fm.save(tmp)

    log.info("generating synthetic dataset into %s", final)
    _build(final, chash, None, build)
    return final


def ensure_prepared(cfg: DictConfig) -> Path:
    """Return a complete prepared dataset directory for ``cfg.dataset``, building it if needed."""
    validate_config(cfg)
    d = cfg.dataset
    final = Path(str(d.prepared_dir)).expanduser()
    pcfg = cfg.get("prepare", {})
    overwrite = bool(_get(pcfg, "overwrite", False))
    if d.format == "synthetic":
        return _synthetic(cfg, final, overwrite)
    files = raw_files(d)
    if files is None:
        if is_complete(final):
            _check_loadable(final, d.format)
            log.info("using prepared dataset %s", final)
            return final
        raise ConfigError(
            f"config key 'dataset.raw_path': no raw data given and dataset.prepared_dir={final} holds no prepared "
            "dataset; set dataset.raw_path (or dataset.train_path/val_path/test_path) or dataset.prepared_dir"
        )
    from .prepare import PrepareOptions, prepare_raw
    from .raw_io import check_path

    files = {
        r: check_path(p, "dataset.raw_path" if r == "raw" else f"dataset.{r}_path") for r, p in files.items()
    }
    chash, ihash = config_hash(cfg), input_hash(files)
    if _reuse_or_check(final, chash, ihash, overwrite):
        log.info("reusing prepared dataset %s (config hash %s, input hash %s)", final, chash, ihash)
        return final
    opts = PrepareOptions(
        on_bad_rows=str(_get(pcfg, "on_bad_rows", "fail")),
        block_size_mb=float(_get(pcfg, "block_size_mb", 16)),
        progress=bool(_get(pcfg, "progress", True)),
    )
    dplain = _container(d)
    log.info("preparing %s from %s into %s", d.format, ", ".join(str(p) for p in files.values()), final)
    _build(final, chash, ihash, lambda tmp: prepare_raw(dplain, files, tmp, opts, chash, ihash))
    return final
