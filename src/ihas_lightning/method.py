"""A method's config (``conf/method/<name>.yaml``), read in one place.

A method names its selector (``selector._target_`` + knobs; null = Base), its architecture update
(``arch_update``: none | joint | bilevel, with ``search_every`` and ``arch_optim``), the stages
``stage=all`` runs for it (``phases``), and optional overrides of the search group's settings
(``search_every``, ``pretrain``, ``model_lr_scale``, ``max_epochs``, ``patience``, ``search_monitor``;
null = ``search.<key>``). :func:`check` validates all of it before any work, one line per bad key."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

PHASES = ("search", "cluster", "derive", "retrain", "evaluate")
OVERRIDABLE = ("search_every", "model_lr_scale", "max_epochs", "patience", "search_monitor")
RETRAIN_INITS = ("searched", "scratch", "rewind", "continue")
#: ``method.retrain_guard`` / ``retrain.guard``: base = a retrained cluster model (or the routed model as a
#: whole) not within search.tolerance of Base on validation is replaced by Base (iHAS); none = as trained
RETRAIN_GUARDS = ("base", "none")
SELECTS = ("best", "last", "sparsest")
OBJECTIVES = ("logloss", "ne")


def setting(cfg: DictConfig, key: str) -> Any:
    """``method.<key>`` when the method sets it, else ``search.<key>``."""
    v = cfg.method.get(key)
    return cfg.search.get(key) if v is None else v


def pretrain(cfg: DictConfig) -> DictConfig:
    """The pretraining block (``method.pretrain``, else ``search.pretrain``); none under transfer."""
    if transferring(cfg):
        return OmegaConf.create({"max_epochs": 0, "patience": None})
    p = cfg.method.get("pretrain")
    return cfg.search.pretrain if p is None else p


def has_selector(cfg: DictConfig) -> bool:
    return cfg.method.get("selector") is not None


# ---- transfer (paper RQ2): another run's frozen selector with this run's backbone ------------------------
def transfer_dir(cfg: DictConfig):
    """``transfer.from`` as a Path (None when unset)."""
    from pathlib import Path

    t = cfg.get("transfer") or {}
    d = t.get("from")
    return None if d in (None, "", "null") else Path(str(d)).expanduser()


def transferring(cfg: DictConfig) -> bool:
    """This run reuses a frozen selector (``transfer.from`` set and the method has a selector)."""
    return has_selector(cfg) and transfer_dir(cfg) is not None


def transfer_ckpt(cfg: DictConfig):
    """The source search checkpoint ``<transfer.from>/search/best.ckpt``."""
    d = transfer_dir(cfg)
    return None if d is None else d / "search" / "best.ckpt"


def skips_search(cfg: DictConfig) -> bool:
    """Under transfer a method that retrains skips its search: cluster / derive read the source's."""
    return transferring(cfg) and "retrain" in _phases(cfg)


def arch_update(cfg: DictConfig) -> str:
    """none | joint | bilevel: the method's, else its selector's default (none without a selector)."""
    if not has_selector(cfg) or transferring(cfg):
        return "none"
    au = cfg.method.get("arch_update")
    if au is not None:
        return str(au)
    from .models.selectors import selector_class

    return selector_class(str(cfg.method.selector._target_)).default_arch_update


def search_every(cfg: DictConfig, batches_per_epoch: int) -> int:
    """Architecture steps every K training batches: ``method.search_every``, else the search group's
    (``auto`` = batches per epoch // search.gate_steps_per_epoch, clipped)."""
    from . import schedule

    v = cfg.method.get("search_every")
    if v is None or v == "auto":
        return schedule.search_every(cfg.search, batches_per_epoch)
    return int(v)


def _phases(cfg: DictConfig) -> list[str]:
    return [str(p) for p in (cfg.method.get("phases") or ["search", "evaluate"])]


def phases(cfg: DictConfig) -> list[str]:
    """The stages stage=all runs for this method (without the search under a retraining transfer)."""
    ph = _phases(cfg)
    return [p for p in ph if p != "search"] if skips_search(cfg) else ph


def cluster_k(cfg: DictConfig) -> int:
    """Clusters of the cluster stage: ``method.cluster_k`` (iHAS-2: 1, one model on all samples), else
    ``cluster.k``."""
    k = cfg.method.get("cluster_k")
    return int(cfg.cluster.k if k is None else k)


def row_name(cfg: DictConfig, which: str) -> str | None:
    rows = cfg.method.get("rows") or {}
    v = rows.get(which)
    return None if v is None else str(v)


def retrain_init(cfg: DictConfig) -> str:
    """``retrain.init`` when set, else the method's ``retrain_init`` (default scratch)."""
    v = cfg.retrain.get("init")
    if v is not None:
        return str(v)
    v = str(cfg.method.get("retrain_init") or "scratch")
    # a transfer replaces the source's backbone: a method default that reuses it (iHAS's continue)
    # becomes the embedding-only warm start
    return "searched" if v in ("rewind", "continue") and transferring(cfg) else v


def retrain_guard(cfg: DictConfig) -> str:
    """``retrain.guard`` when set, else the method's ``retrain_guard`` (default none: the baselines
    retrain as their authors specify)."""
    v = cfg.retrain.get("guard")
    if v is None:
        v = cfg.method.get("retrain_guard")
    return "none" if v is None else str(v)


def spec(cfg: DictConfig, search_epochs: int) -> dict[str, Any]:
    """What the search module needs of the method (plain, resolved; saved in its hyperparameters)."""
    m = cfg.method
    selector = OmegaConf.to_container(m.selector, resolve=True) if m.get("selector") is not None else None
    extra = budget_from(cfg)
    if selector is not None and extra is not None:  # PEP at the size of another run's final model
        selector["budgets"] = [*selector.get("budgets", []), extra]
        selector["retrain_budget"] = extra
    out: dict[str, Any] = {
        "name": str(m.name),
        "selector": selector,
        "arch_update": m.get("arch_update"),
        "arch_optim": OmegaConf.to_container(m.arch_optim, resolve=True) if m.get("arch_optim") else {},
        "snapshots": list(m.get("snapshots") or []),
        "objective": str(m.get("objective") or "logloss"),
        "search_epochs": int(search_epochs),
        # transfer: the selector is loaded from another run and frozen (no architecture update)
        "frozen_selector": transferring(cfg),
    }
    return out


def model_cfg(cfg: DictConfig) -> dict[str, Any]:
    """``model.*`` with the method's embedding optimizer, when it needs one (e.g. OptFS: dense Adam)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    eo = cfg.method.get("embedding_optimizer")
    if eo is not None:
        model["embedding_optimizer"] = str(eo)
    wd = cfg.method.get("model_weight_decay")
    if wd is not None:
        model["weight_decay"] = float(wd)
    return model


def budget_from(cfg: DictConfig) -> int | None:
    """The embedding-parameter count of the final model in the run dir ``method.budget_from`` (PEP at
    iHAS's size); None when unset. A one-line DataError when the run dir has no results."""
    import json
    from pathlib import Path

    from .errors import DataError

    d = cfg.method.get("budget_from")
    if d in (None, "", "null"):
        return None
    res = Path(str(d)).expanduser() / "evaluate" / "results.json"
    if not res.is_file():
        raise DataError(f"{res}: no evaluate/results.json in method.budget_from (run stage=all there first)")
    r = json.loads(res.read_text())
    final = next((x for x in r["rows"] if x["model"] == r.get("final_row", "iHAS")), None)
    if final is None or not final.get("embedding_params"):
        raise DataError(f"{res}: no final row with embedding_params (method.budget_from)")
    return int(final["embedding_params"])


def _err(key: str, msg: str) -> ConfigError:
    return ConfigError(f"config key 'method.{key}': {msg}")


def check(cfg: DictConfig) -> None:
    """Every method key a run will use, checked before any work."""
    m = cfg.method
    if not m.get("name"):
        raise _err("name", "missing")
    for p in _phases(cfg):
        if p not in PHASES:
            raise _err("phases", f"unknown phase {p!r} (choose from {list(PHASES)})")
    if _phases(cfg)[0] != "search":
        raise _err("phases", "must start with search")
    _check_selector(cfg)
    _check_optimizers(m)
    _check_selection(cfg)
    _check_retrain_init(cfg)
    _check_budget(m)
    if m.get("search_monitor") is not None:
        from .training import MONITORS, check_monitor

        check_monitor(m.get("search_monitor"), "method.search_monitor", MONITORS)
    if not isinstance(m.early_stop, bool):
        raise _err("early_stop", f"must be true or false (got {m.get('early_stop')!r})")
    if m.get("pretrain") is not None:
        from .training import check_fit_cfg

        check_fit_cfg(m.pretrain, "method.pretrain", min_epochs=0)
    check_transfer(cfg)


def _check_selector(cfg: DictConfig) -> None:
    """method.gate and method.selector: resolvable, with a _target_, and buildable on a stand-in shape."""
    from .models.selectors import build_selector

    m = cfg.method
    target = str((m.get("selector") or {}).get("_target_", ""))
    if m.get("gate") is not None and target.endswith("BernoulliSelector"):
        check_gate_cfg(m.gate)
    if not has_selector(cfg):
        return
    try:
        spec_ = OmegaConf.to_container(m.selector, resolve=True)
    except Exception as e:  # noqa: BLE001 - a bad interpolation
        raise _err("selector", f"cannot be resolved ({e})") from None
    if not isinstance(spec_, dict) or "_target_" not in spec_:
        raise _err("selector", "must be a block with a _target_ (or null for no selector)")
    try:  # a stand-in shape: the knobs' types and ranges (k against the real field count: at build)
        build_selector(spec_, 64, 2, [3] * 64)
    except TypeError as e:
        raise _err("selector", f"{spec_['_target_']}: {e}") from None
    except ValueError as e:
        raise _err("selector", str(e)) from None


def _check_optimizers(m: DictConfig) -> None:
    """method.arch_update, method.arch_optim (type, lr, weight_decay), method.embedding_optimizer."""
    from .models.selectors import ARCH_UPDATES

    au = m.get("arch_update")
    if au is not None and au not in ARCH_UPDATES:
        raise _err("arch_update", f"must be one of {list(ARCH_UPDATES)} (got {au!r})")
    ao = m.get("arch_optim") or {}
    if ao:
        if ao.get("type", "adam") not in ("adam", "sgd"):
            raise _err("arch_optim.type", f"must be adam or sgd (got {ao.get('type')!r})")
        for key, lo in (("lr", 0.0), ("weight_decay", 0.0)):
            v = ao.get(key)
            if v is None and key == "weight_decay":
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < lo or (key == "lr" and v == 0):
                raise _err(
                    f"arch_optim.{key}", f"must be a number {'> 0' if key == 'lr' else '>= 0'} (got {v!r})"
                )
    eo = m.get("embedding_optimizer")
    if eo is not None:
        from .optim import EMBEDDING_OPTIMIZERS

        if eo not in EMBEDDING_OPTIMIZERS:
            raise _err(
                "embedding_optimizer", f"must be one of {list(EMBEDDING_OPTIMIZERS)} or null (got {eo!r})"
            )


def _check_selection(cfg: DictConfig) -> None:
    """method.select (sparsest needs a selector that can open every gate), method.objective,
    method.snapshots' tags."""
    from .models.selectors import selector_class

    m = cfg.method
    sel = m.select
    if sel not in SELECTS:
        raise _err("select", f"must be one of {list(SELECTS)} (got {sel!r})")
    if (
        sel == "sparsest"
        and has_selector(cfg)
        and not hasattr(selector_class(str(m.selector._target_)), "open_all")
    ):
        raise _err(
            "select", f"sparsest needs a selector that can open every gate ({m.selector._target_} cannot)"
        )
    obj = m.get("objective")
    if obj not in OBJECTIVES:
        raise _err("objective", f"must be one of {list(OBJECTIVES)} (got {obj!r})")
    for t in m.get("snapshots") or []:
        t = str(t)
        if t != "init" and not (t.startswith("epoch_") and t[6:].isdigit()):
            raise _err("snapshots", f"tags are 'init' or 'epoch_<r>' (got {t!r})")


def _check_retrain_init(cfg: DictConfig) -> None:
    """method.retrain_init, against transfer.from and method.rewind_tag; method.retrain_guard."""
    m = cfg.method
    ri = m.get("retrain_init")
    if ri is not None and ri not in RETRAIN_INITS:
        raise _err("retrain_init", f"must be one of {list(RETRAIN_INITS)} (got {ri!r})")
    rg = m.get("retrain_guard")
    if rg is not None and rg not in RETRAIN_GUARDS:
        raise _err("retrain_guard", f"must be one of {list(RETRAIN_GUARDS)} or null (none) (got {rg!r})")
    if transferring(cfg) and "retrain" in _phases(cfg) and retrain_init(cfg) in ("rewind", "continue"):
        raise ConfigError(
            f"config key 'retrain.init': {retrain_init(cfg)} reuses the source's backbone, which transfer.from "
            "replaces; use retrain.init=searched or scratch"
        )
    if "retrain" in phases(cfg) and retrain_init(cfg) == "rewind":
        tag = m.get("rewind_tag")
        if tag is None or str(tag) not in [str(t) for t in (m.get("snapshots") or [])]:
            raise _err(
                "rewind_tag",
                f"names the snapshot to rewind to; it must be one of method.snapshots (got {tag!r})",
            )


def _check_budget(m: DictConfig) -> None:
    """method.max_epochs / patience / search_every, model_weight_decay, model_lr_scale."""
    for key in ("max_epochs", "patience", "search_every"):
        v = m.get(key)
        lo = 0 if key == "patience" else 1
        if (
            v is not None
            and not (key == "search_every" and v == "auto")
            and (not isinstance(v, int) or isinstance(v, bool) or v < lo)
        ):
            raise _err(key, f"must be an integer >= {lo} or null (= search.{key}) (got {v!r})")
    v = m.get("model_weight_decay")
    if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
        raise _err("model_weight_decay", f"must be >= 0 or null (= model.weight_decay) (got {v!r})")
    v = m.get("model_lr_scale")
    if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
        raise _err("model_lr_scale", f"must be > 0 or null (got {v!r})")


def check_transfer(cfg: DictConfig) -> None:
    """``transfer.*`` (when a selector is transferred): the source exists, or will be searched."""
    from .errors import DataError
    from .models.backbones import BACKBONES

    if not transferring(cfg):
        return
    t = cfg.transfer
    if not isinstance(t.get("search_if_missing"), bool):
        raise ConfigError(
            f"config key 'transfer.search_if_missing': must be true or false (got {t.get('search_if_missing')!r})"
        )
    if t.get("source_backbone") not in BACKBONES:
        raise ConfigError(
            f"config key 'transfer.source_backbone': must be one of {sorted(BACKBONES)} (got {t.get('source_backbone')!r})"
        )
    ck = transfer_ckpt(cfg)
    if not t.search_if_missing and not ck.is_file():
        raise DataError(
            f"{ck}: no search checkpoint in transfer.from (run stage=all there first, or set "
            "transfer.search_if_missing=true)"
        )


def check_gate_cfg(gate: DictConfig) -> None:
    """One-line ConfigError naming the ``method.gate.<key>`` whose value is out of range."""
    from .models.gate import INPUT_NORMS, THRESHOLDS

    def num(key: str, default: float | None) -> float | None:
        v = gate.get(key, default)
        if v is None:
            return None
        try:
            return float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"config key 'method.gate.{key}': must be a number (got {v!r})") from None

    rules = [
        ("tau", 0.1, lambda v: v > 0, "must be > 0"),
        ("lambda_reg", 1e-4, lambda v: v >= 0, "must be >= 0"),
        ("bins", 20, lambda v: v >= 3 and v == int(v), "must be an integer >= 3"),
        ("lr", 1e-3, lambda v: v > 0, "must be > 0"),
        ("weight_decay", None, lambda v: v >= 0, "must be >= 0 (or null: model.weight_decay)"),
        ("init_bias", 3.0, lambda v: v == v, "must be a number"),
    ]
    for key, default, ok, rule in rules:
        v = num(key, default)
        if v is not None and not ok(v):
            raise ConfigError(f"config key 'method.gate.{key}': {rule} (got {gate.get(key)})")
    norm = gate.get("input_norm", "none")
    if norm not in INPUT_NORMS:
        raise ConfigError(
            f"config key 'method.gate.input_norm': must be one of {list(INPUT_NORMS)} (got {norm!r})"
        )
    rule = gate.get("threshold", "valley")
    if rule not in THRESHOLDS:
        raise ConfigError(
            f"config key 'method.gate.threshold': must be one of {list(THRESHOLDS)} (got {rule!r})"
        )
