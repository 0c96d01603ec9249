"""Data-size-aware training budgets: the batch size, the gate schedule and the output-bias prior.

The paper's values (batch 2048, one gate step every 100 training batches) assume full Criteo: about
18k batches per epoch, so a search epoch makes ~180 gate steps. On an 8k-row sample the same values
give 4 batches per epoch and 3-4 gate steps in a whole search. These rules keep the paper's values
where the data is large and reach the same regime (enough optimizer and gate steps per epoch) on
any size:

* ``model.batch_size: auto`` -- the largest power of two <= ``model.max_batch_size`` (2048, the
  paper) that still gives ``model.min_batches_per_epoch`` batches per epoch (32), never below 32
  rows. Full Criteo (36M train rows) gets 2048; a 7,200-row sample gets 128; a 3,000-row cluster 64.
* ``search.search_every: auto`` -- ``batches_per_epoch // search.gate_steps_per_epoch``, clipped to
  ``[1, search.max_search_every]`` (100, the paper). Full Criteo: 100; a 57-batch epoch: 1 (a gate
  step after every training batch).

An integer in either key is used as given. Every fit is also bounded by a max-epochs budget and
early-stopped on validation (see the stage configs), so the number of epochs adapts as well.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError

AUTO = "auto"
MIN_AUTO_BATCH = 32


def _int(value: Any, key: str, minimum: int = 1) -> int:
    try:
        v = int(value)
        if v != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}': must be an integer or 'auto' (got {value!r})") from None
    if v < minimum:
        raise ConfigError(f"config key '{key}': must be >= {minimum} (got {v})")
    return v


def _settings(node: Any, group: str, key: str, cap_key: str, cap: int, per_key: str, per: int):
    """(value or AUTO, cap, per-epoch count) of an auto-or-integer key, each validated."""
    v = node.get(key, AUTO)
    if v != AUTO:
        v = _int(v, f"{group}.{key}")
    return (
        v,
        _int(node.get(cap_key, cap), f"{group}.{cap_key}"),
        _int(node.get(per_key, per), f"{group}.{per_key}"),
    )


def check_batch_size(model_cfg: Any) -> None:
    """Validate ``model.batch_size`` / ``max_batch_size`` / ``min_batches_per_epoch`` (no data needed)."""
    _settings(model_cfg, "model", "batch_size", "max_batch_size", 2048, "min_batches_per_epoch", 32)


def batch_size(model_cfg: Any, train_rows: int) -> int:
    """The training batch size for a fit on ``train_rows`` rows (see the module docstring)."""
    bs, cap, per_epoch = _settings(
        model_cfg, "model", "batch_size", "max_batch_size", 2048, "min_batches_per_epoch", 32
    )
    if bs != AUTO:
        return bs
    want = max(1, int(train_rows) // per_epoch)
    b = 1 << max(0, want.bit_length() - 1)  # largest power of two <= want
    return max(min(b, cap), min(MIN_AUTO_BATCH, cap))


def check_search_every(search_cfg: Any) -> None:
    _settings(search_cfg, "search", "search_every", "max_search_every", 100, "gate_steps_per_epoch", 50)


def search_every(search_cfg: Any, batches_per_epoch: int) -> int:
    """Training batches between two gate steps (see the module docstring)."""
    every, cap, per_epoch = _settings(
        search_cfg, "search", "search_every", "max_search_every", 100, "gate_steps_per_epoch", 50
    )
    if every != AUTO:
        return every
    return max(1, min(cap, int(batches_per_epoch) // per_epoch))


def batches_per_epoch(rows: int, batch: int) -> int:
    return max(1, math.ceil(int(rows) / int(batch)))


def patience_epochs(patience: int | None, batches_per_epoch: int, patience_steps: int | None) -> int | None:
    """Early stopping's patience in epochs: at least ``patience`` epochs and at least ``patience_steps``
    training batches without improvement. An epoch of 40 batches (a sample) is not an epoch of 20k
    (full Criteo): a fixed count of epochs stops a small fit on a plateau it would leave a few hundred
    steps later, and keeps a large one waiting for hours. None stays None (no early stopping)."""
    if patience is None:
        return None
    need = math.ceil(int(patience_steps or 0) / max(1, int(batches_per_epoch)))
    return max(int(patience), need)


def base_rate_entropy(positive_rate: float | None) -> float | None:
    """Logloss of the constant predictor at ``positive_rate`` on rows of that rate (its entropy, nats):
    the unit of normalized entropy (logloss / this)."""
    if positive_rate is None:
        return None
    p = min(max(float(positive_rate), 1e-6), 1 - 1e-6)
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def prior_logit(positive_rate: float | None) -> float | None:
    """Log-odds of a positive rate (the output bias of a model that predicts the base rate)."""
    if positive_rate is None:
        return None
    p = min(max(float(positive_rate), 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))
