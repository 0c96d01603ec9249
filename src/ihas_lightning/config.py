"""Config helpers: where the Hydra config tree lives, custom resolvers, composing in tests."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# conf/ sits at the repository root; the package reaches it as ihas_lightning/conf (a link in the
# repository, real files in an installed wheel). IHAS_CONF_DIR overrides it.
CONFIG_DIR = Path(os.environ.get("IHAS_CONF_DIR", Path(__file__).resolve().parent / "conf"))

_UID = f"{os.getpid():x}{secrets.token_hex(2)}"


def register_resolvers() -> None:
    """``${ihas_uid:}``: a per-process id, so run dirs of jobs started in the same second differ; and
    the config schema (:mod:`ihas_lightning.schema`) in Hydra's ConfigStore."""
    from . import schema

    schema.register()
    if not OmegaConf.has_resolver("ihas_uid"):
        OmegaConf.register_new_resolver("ihas_uid", lambda: _UID)


def compose(overrides: list[str] | None = None, output_dir: str | os.PathLike | None = None) -> DictConfig:
    """Compose the real config outside ``@hydra.main`` (tests, notebooks, benchmarks).

    ``output_dir`` replaces Hydra's run dir (``paths.output_dir``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []), return_hydra_config=False)
    if output_dir is not None:
        cfg.paths.output_dir = str(output_dir)
    return cfg


def load_group_option(group: str, name: str) -> DictConfig:
    """One option of a config group (``conf/<group>/<name>.yaml``) with the group-relative entries of
    its defaults list merged in, as Hydra composes it (used to swap e.g. ``method`` inside a job)."""
    node = OmegaConf.load(CONFIG_DIR / group / f"{name}.yaml")
    defaults = node.pop("defaults", None) or []
    merged = OmegaConf.create()
    self_seen = False
    for entry in defaults:
        if entry == "_self_":
            merged = OmegaConf.merge(merged, node)
            self_seen = True
        else:
            merged = OmegaConf.merge(merged, load_group_option(group, str(entry)))
    return merged if self_seen else OmegaConf.merge(merged, node)


def group_defaults(group: str, name: str, key: str | None = None) -> dict:
    """The resolved values of one group option (e.g. ``model/mlp``), for code that is called without
    Hydra: a module built in Python takes its missing keys from the same YAML file a run composes, so
    every default lives in ``conf/`` only."""
    ck = (group, name, key)
    if ck not in _DEFAULTS_CACHE:
        node = load_group_option(group, name)
        if key is not None:
            node = node[key]
        _DEFAULTS_CACHE[ck] = OmegaConf.to_container(node, resolve=True)
    return dict(_DEFAULTS_CACHE[ck])


_DEFAULTS_CACHE: dict = {}
