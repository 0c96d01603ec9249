"""A finished run dir's models, loaded as ``stage=evaluate`` scores them and as ``stage=predict``
serves them: Base, the method's search model and its final model (for iHAS the routed set of cluster
models: searched embedding + gate -> nearest centroid -> that cluster's retrained model).

Below the stages (each may import it; it imports none of them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from . import method
from .data.feature_map import FeatureMap
from .errors import DataError
from .routing import RoutedModel, cluster_features, nearest_centroid
from .rundir import (  # noqa: F401 - base_checkpoint re-exported
    base_checkpoint,
    check_cluster_fits,
    data_dir_for,
    load_arch_dir,
    load_cluster_models,
    load_search_model,
    output_dir,
    prepared_dir,
    resolve_arch_dir,
    resolve_retrain_dir,
    resolve_search_ckpt,
)

#: (row name, logits function x -> [B], model for the parameter counts or None, note)
Entry = tuple[str, Callable, Any, str]


@dataclass
class RunModels:
    """The models of one run dir, in table order (``entries``; the last is the method's final model)."""

    fmap: FeatureMap
    prepared: Path
    search_ckpt: Path
    search: Any
    entries: list[Entry]
    routed: RoutedModel | None = None
    routed_fast: RoutedModel | None = None  # the same models routed by the distilled router
    modules: list[Any] = field(default_factory=list)  # the retrained cluster modules (RetrainModule)
    k: int = 0
    ainfo: dict[str, Any] | None = None
    arch_dir: Path | None = None
    retrain_dir: Path | None = None
    base_ckpt: Path | None = None
    search_row: str | None = None  # the search model's row (None for Base, or under transfer)
    modes: dict[str, str] = field(default_factory=dict)  # a plain model's forward mode, by row

    def serving_module(self, which: str = "final", routing: str = "exact") -> ServingModule:
        """One of the models as a plain ``nn.Module`` (what ``stage=export`` exports): ``x int64 [B, F] ->
        (probability [B], cluster [B])``; ``routing=fast``: the routed model with the distilled router.

        A plain model is exported as trained, not folded: in ONNX Runtime its lookup + matrix product
        is as fast as the folded lookup + sum at Criteo scale and 1.4x faster on the 12-field synthetic
        set (``experiments/results/bench_serve.md``: ``onnx_base`` / ``onnx_base_folded``); the routed
        model keeps its serving layout."""
        name, fn, model, _ = self.entry(which)
        if fn is self.routed:
            return ServingModule(routed=self.routed_model(routing))
        return ServingModule(model=model, mode=self.modes[name])

    def routed_model(self, routing: str = "exact") -> RoutedModel | None:
        """The routed model with exact (searched embedding + gate) or fast (distilled router) routing."""
        if routing == "fast":
            if self.routed_fast is None:
                raise DataError("routing=fast: the run has no distilled router (cluster/router.pt; re-run "
                                "stage=cluster with cluster.router.enabled=true)")  # fmt: skip
            return self.routed_fast
        return self.routed

    @property
    def final(self) -> str:
        return self.entries[-1][0]

    def entry(self, which: str = "final") -> Entry:
        """``final`` (the method's final model), ``base``, ``search`` (the search model with its selector
        at inference), or a row name."""
        names = [e[0] for e in self.entries]
        row = {"final": names[-1], "base": "Base", "search": self.search_row}.get(which, which)
        if row in names:
            return self.entries[names.index(row)]
        raise ValueError(f"the run has no {which!r} model (its models: {', '.join(names)})")


class ServingModule(nn.Module):
    """What an exported artifact computes: ``x int64 [B, F]`` (the prepared ids) -> ``(probability
    float32 [B], cluster int64 [B])``; ``cluster`` is 0 for a model that does not route.

    The routed model runs every cluster model on the batch and gathers each row's own output: the
    same numbers as :func:`ihas_lightning.routing.dispatch` (which runs each model on its rows only),
    in a graph without data-dependent shapes (ONNX, ``torch.export``); K is small (2-5)."""

    def __init__(self, routed: RoutedModel | None = None, model: nn.Module | None = None, mode: str = "open"):
        super().__init__()
        self.routed, self.model, self.mode = routed, model, mode

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.routed is None:
            logits = self.model(x, self.mode)
            return torch.sigmoid(logits), torch.zeros_like(logits, dtype=torch.int64)
        r = self.routed
        if r.fast and r.fused is not None:
            logits, c = r.fused(x)
            return torch.sigmoid(logits), c
        if r.fast:
            c = r.router.forward(x).argmax(1)
        else:
            feats, _ = cluster_features(r.search_model, x, r.input)
            c = nearest_centroid(feats, r.centroids)
        logits = torch.stack([m(x) for m in r.cluster_models], 1).gather(1, c.unsqueeze(1)).squeeze(1)
        return torch.sigmoid(logits), c


#: ``predict.routing`` / ``export.routing``
ROUTINGS = ("exact", "fast", "auto")


def choose_routing(run_dir: Path, routing: str, rm: RunModels, which: str = "final") -> tuple[str, str]:
    """(``exact`` | ``fast``, why) for serving ``which`` of the run. ``auto`` takes the fast routing
    where ``stage=evaluate`` judged it within 0.001 AUC of the exact routing on validation (the whole 95%
    interval of the difference above -0.001: ``fast_routing.val_within_0.001 == "met"`` in
    ``<run>/evaluate/results.json``), else the exact one; a model that does not route is served as it
    is (``exact``)."""
    from .rundir import EVALUATE_DIR
    from .utils import read_json

    if routing != "auto":
        return routing, f"routing={routing} given"
    if rm.entry(which)[1] is not rm.routed:
        return "exact", "the model does not route"
    if rm.routed_fast is None:
        return "exact", "the run has no distilled router"
    res = run_dir / EVALUATE_DIR / "results.json"
    if not res.is_file():
        return "exact", f"no {res} to judge the fast routing by (run stage=evaluate)"
    fr = read_json(res).get("fast_routing") or {}
    verdict = fr.get("val_within_0.001")
    if verdict is None:
        return "exact", f"{res} has no verdict on the fast routing (re-run stage=evaluate)"
    d, (lo, hi) = fr.get("val_auc_minus_exact"), fr.get("val_auc_minus_exact_ci95") or [None, None]
    rerouted = fr.get("val_rerouted_rows")
    judged = "" if d is None or lo is None else (
        f" (validation AUC {d:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}]"
        + ("" if rerouted is None else f", {rerouted} rows routed differently") + ")"
    )  # fmt: skip
    if verdict == "met":
        return "fast", f"fast routing within 0.001 AUC of the exact on validation{judged}"
    return "exact", f"fast routing within 0.001 AUC of the exact on validation: {verdict}{judged}"


def served_fn(model: nn.Module) -> Callable:
    """The logits function of an open-mode model (no selector at inference) in its serving layout
    (:func:`~ihas_lightning.models.compact.compact`: the first layer folded into the table where it
    pays; the same logits to 1e-6)."""
    from .models.compact import compact

    m = compact(model)
    return lambda x: m(x, "open")


def auc_logloss(logits: torch.Tensor, y: torch.Tensor) -> tuple[float | None, float | None]:
    """(AUC, logloss) of logits against 0/1 labels (None when undefined)."""
    if len(y) == 0:
        return None, None
    from sklearn.metrics import roc_auc_score

    ll = float(F.binary_cross_entropy_with_logits(logits.double(), y.double()))
    yy = y.numpy()
    auc = float(roc_auc_score(yy, torch.sigmoid(logits).numpy())) if 0 < yy.sum() < len(yy) else None
    return auc, ll


RUN_CONFIG = "config.yaml"


def save_run_config(cfg: DictConfig, run_dir: Path) -> None:
    """The run's resolved config, beside its stage dirs: what ``stage=predict`` rebuilds the models from."""
    from omegaconf import OmegaConf

    from .utils import atomic_write_text

    atomic_write_text(
        Path(run_dir) / RUN_CONFIG, OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True))
    )


def load_run_config(run_dir: Path) -> DictConfig:
    """The config a finished run dir was made with (``config.yaml``, else Hydra's ``.hydra/config.yaml``),
    with ``paths.output_dir`` pointing at ``run_dir`` (a moved run dir still works)."""
    from omegaconf import OmegaConf, open_dict

    run_dir = Path(run_dir)
    for p in (run_dir / RUN_CONFIG, run_dir / ".hydra" / "config.yaml"):
        if p.is_file():
            cfg = OmegaConf.load(p)
            break
    else:
        raise DataError(f"{run_dir}: not a run dir of stage=all (no {RUN_CONFIG}; run stage=all there first)")
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def load_run_models(cfg: DictConfig) -> RunModels:
    """Every model of the run dir ``paths.output_dir`` that ``cfg.method`` produced, in eval mode."""
    retrain_dir = arch_dir = ainfo = None
    if "retrain" in method.phases(cfg):
        retrain_dir = resolve_retrain_dir(cfg)
        arch_dir, _ = resolve_arch_dir(cfg, retrain_dir)
        ainfo = load_arch_dir(arch_dir)
        search_ckpt = resolve_search_ckpt(cfg, arch_dir)
        prepared = data_dir_for(cfg, ainfo)
    else:
        search_ckpt = resolve_search_ckpt(cfg)
        prepared = prepared_dir(cfg)
    fmap = FeatureMap.load(prepared)
    search = load_search_model(search_ckpt, fmap).model.eval()
    rm = RunModels(fmap=fmap, prepared=prepared, search_ckpt=search_ckpt, search=search, entries=[],
                   ainfo=ainfo, arch_dir=arch_dir, retrain_dir=retrain_dir)  # fmt: skip
    # the models, in table order: (row name, logits fn, model for params, note)
    _add_base_and_search(cfg, rm)
    if retrain_dir is not None:
        _add_retrained(cfg, rm)
    return rm


def _add_base_and_search(cfg: DictConfig, rm: RunModels) -> None:
    """The Base row (this run's model for method=base, else ``evaluate.base_ckpt``) and the search
    model's row (deterministic masks; not under transfer, where it is the source's)."""
    search = rm.search
    if not method.has_selector(cfg):
        rm.entries.append(("Base", served_fn(search), search, "all fields, full dims"))
        rm.modes["Base"] = "open"
        return
    rm.base_ckpt = base_checkpoint(cfg)
    if rm.base_ckpt is not None:
        base = load_search_model(rm.base_ckpt, rm.fmap).model.eval()
        rm.entries.append(("Base", served_fn(base), base, "all fields, full dims"))
        rm.modes["Base"] = "open"
    note = "search model" if rm.retrain_dir is not None else "selector at inference"
    if not method.skips_search(cfg):  # under transfer the search model is the source's (another backbone)
        rm.search_row = method.row_name(cfg, "search") or str(cfg.method.name)
        rm.entries.append((rm.search_row, lambda x: search(x, "deterministic"), search, note))
        rm.modes[rm.search_row] = "deterministic"


def _add_retrained(cfg: DictConfig, rm: RunModels) -> None:
    """The retrained models' row: routed (exact, and fast where a distilled router was fitted) for k > 1
    clusters, else the single retrained model (iHAS-2, a baseline's retrained architecture)."""
    ainfo, fmap = rm.ainfo, rm.fmap
    check_cluster_fits(rm.arch_dir, ainfo, fmap)
    rm.k = k = int(ainfo["k"])
    rm.modules = modules = load_cluster_models(rm.retrain_dir, k)
    for c, m in enumerate(modules):
        if getattr(m, "fallback", None) == "base":  # the retrain guard's fallback: Base's model, full dims
            continue
        if list(m.model.field_dims) != [int(d) for d in ainfo["field_dims"][c]]:
            raise DataError(
                f"{rm.retrain_dir}/cluster_{c}/best.ckpt: its field dims differ from {rm.arch_dir}'s architecture"
            )
    final_row = method.row_name(cfg, "final") or str(cfg.method.name)
    if ainfo.get("centroids") is not None and k > 1:  # one cluster (iHAS-2): a single model, no routing
        if rm.search.gate is None:
            raise DataError(f"{rm.search_ckpt}: routing needs the searched model with its Bernoulli gate")
        router = None
        if ainfo.get("router_state") is not None:
            from .models.router import LinearRouter

            st = ainfo["router_state"]
            router = LinearRouter(st["vocab_sizes"], int(st["k"]))
            router.load_state_dict(st["state_dict"])
            router.eval()
        rm.routed = RoutedModel(
            rm.search,
            ainfo["centroids"],
            [m.model for m in modules],
            input=str(ainfo.get("input", "masked_embedding")),
            router=router,
        ).compact()  # fmt: skip  (each cluster model in its serving layout: the same logits, fewer ops)
        if router is not None:
            rm.routed_fast = rm.routed.with_fast_routing()
            rm.entries.append((f"{final_row} (fast routing)", rm.routed_fast, None, ""))
        rm.entries.append((final_row, rm.routed, None, ""))
        return
    single = modules[0].model.eval()
    rm.entries.append(
        (final_row, served_fn(single), single, _single_note(single, fmap, int(ainfo["embed_dim"])))
    )
    rm.modes[final_row] = "open"


def _single_note(single, fmap: FeatureMap, d: int) -> str:
    """Kept fields, dims, embedding rows and entries of a single retrained model, against the full."""
    kept = [n for n, fd in zip(fmap.field_names, single.field_dims) if fd]
    note = f"{len(kept)}/{len(single.field_dims)} fields"
    full = len(single.field_dims) * d
    if sum(single.field_dims) != len(kept) * d:
        note += f", {sum(single.field_dims)}/{full} dims"
    if single.embedding.pruned:
        rows_kept = single.embedding.embedding_entries() // max(1, d)
        note += f", {rows_kept:,}/{sum(fmap.vocab_sizes):,} values"
    if single.embedding.entry_masked:
        note += f", {single.embedding.embedding_entries():,}/{sum(fmap.vocab_sizes) * d:,} entries"
    return note
