"""Checks of the keys every stage uses (``seed``, ``model.*``), before any work: one line naming the
key, exit 2. Each stage checks its own group in its ``check_cfg``; checks that need the data (e.g.
``cluster.k`` against the training rows) run right after ``prepare`` (:func:`check_against_data`)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from .errors import ConfigError


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_common(cfg: DictConfig) -> None:
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
