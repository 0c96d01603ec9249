"""The config is checked before any work, in three tiers, each failing with one line naming the key
(exit 2):

1. **types and key names** -- Hydra, while composing, against the schema (:mod:`ihas_lightning.schema`);
2. **values** -- :func:`check_config`: ``seed``, ``model.*`` (:func:`check_common`) and the
   ``check_cfg`` of every stage the run will execute (ranges, choices, cross-key rules), then the
   ``trainer.*`` arguments (a Lightning Trainer is built from them and thrown away);
3. **against the data** -- :func:`check_against_data` right after ``prepare`` and before any training
   (``cluster.k`` against the training rows).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from .errors import ConfigError


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_common(cfg: DictConfig) -> None:
    from .schema import unknown_keys

    extra = unknown_keys(cfg)
    if extra:
        group = extra[0].rsplit(".", 1)[0] if "." in extra[0] else "the config"
        raise ConfigError(
            f"config key '{extra[0]}': no such key in {group} (the schema, src/ihas_lightning/schema.py, "
            "lists every key)"
        )
    seed = cfg.get("seed")
    if not _int(seed) or seed < 0:
        raise ConfigError(f"config key 'seed': must be an integer >= 0 (got {seed!r})")
    m = cfg.get("model")
    if m is None:
        return
    rules = [
        ("embed_dim", lambda v: _int(v) and v >= 1, "an integer >= 1"),
        ("lr", lambda v: _num(v) and v > 0, "a number > 0"),
        ("weight_decay", lambda v: _num(v) and v >= 0, "a number >= 0"),
        ("dropout", lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)"),
        ("batchnorm", lambda v: isinstance(v, bool), "true or false"),
    ]
    for key, ok, rule in rules:
        if key in m and not ok(m.get(key)):
            raise ConfigError(f"config key 'model.{key}': must be {rule} (got {m.get(key)!r})")
    hidden = m.get("hidden")
    if hidden is not None and (isinstance(hidden, (str, int)) or not all(_int(h) and h >= 1 for h in hidden)):
        raise ConfigError(f"config key 'model.hidden': must be a list of integers >= 1 (got {hidden!r})")


def stages_of(cfg: DictConfig) -> list[str]:
    """The stages a run will execute, in order (``stage=all``: prepare, search and the method's phases)."""
    from . import method

    name = str(cfg.stage.name)
    if name in (
        "report",
        "predict",
        "export",
    ):  # they read a finished run / multirun, not the configured dataset
        return [name]
    if name == "all":
        return list(dict.fromkeys(["prepare", "search", *method.phases(cfg)]))
    return list(dict.fromkeys(["prepare", name]))


def check_config(cfg: DictConfig, trainer: bool = True) -> None:
    """Tier 2: every value the run will use. ``trainer=False`` skips the Trainer check (it imports
    Lightning, ~4 s), so the entry point can report every other key in about a second."""
    from .allocator import check as check_malloc
    from .stages import stage_module
    from .threads import check as check_threads

    check_common(cfg)
    check_threads((cfg.get("trainer") or {}).get("threads", "auto"))
    check_malloc((cfg.get("trainer") or {}).get("malloc_tuning", True))
    stages = stages_of(cfg)
    for name in stages:
        stage_module(name).check_cfg(cfg)
    if trainer and any(s in ("search", "retrain") for s in stages):
        from .training import check_trainer

        check_trainer(cfg)


def check_against_data(cfg: DictConfig, feature_map: Any, phases: list[str]) -> None:
    """What needs the prepared data, before any training: ``cluster.k`` against the training rows."""
    from . import method

    if "cluster" in phases:
        k = method.cluster_k(cfg)
        rows = int(feature_map.rows("train"))
        if k > rows:
            key = "method.cluster_k" if cfg.method.get("cluster_k") is not None else "cluster.k"
            raise ConfigError(
                f"config key '{key}': {k} clusters need at least {k} training rows; the train split has {rows:,}"
            )
