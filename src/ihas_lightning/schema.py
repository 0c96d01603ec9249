"""The config's schema: one dataclass per config group, registered with Hydra's ConfigStore.

``conf/config.yaml`` lists ``ihas_schema`` first in its defaults, so Hydra merges every group's YAML
and every command-line override into these typed nodes while composing (before a single module of
ours is imported). A key that does not exist (``model.lrr=1``) or a value of the wrong type
(``seed=abc``, ``cluster.batch_size=x``, ``model.hidden=abc``) therefore fails at composition; the
entry point turns Hydra's message into one line naming the key (exit 2).

The schema holds **types only**. The values live in ``conf/<group>/*.yaml`` (with their comments),
the one place for defaults; the rules that a type cannot express (ranges, choices, cross-key rules)
are each stage's ``check_cfg`` and :mod:`ihas_lightning.validate`, all run before any work.

Left open on purpose (``Dict[str, Any]``, checked by their own code):

* ``dataset`` -- each format has its own keys (``conf/dataset/*.yaml``), checked by ``prepare``'s
  ``validate_config`` before anything is read;
* ``trainer`` -- any ``lightning.Trainer`` argument may be added (``+trainer.gradient_clip_val=1``);
  the keys are checked against the Trainer's signature and the values by building a Trainer;
* ``transfer`` -- its key ``from`` is a Python keyword (checked in :func:`method.check_transfer`);
* ``model.backbone_args``, ``method.selector`` and ``method.gate`` -- per backbone / per method,
  checked by building the backbone / by :func:`method.check_gate_cfg`.
"""

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

SCHEMA_NAME = "ihas_schema"


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    shared_dir: str = MISSING
    log_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class PrepareConfig:
    overwrite: bool = MISSING
    on_bad_rows: str = MISSING
    block_size_mb: float = MISSING
    progress: bool = MISSING


@dataclass
class PretrainConfig:
    max_epochs: int | None = MISSING
    patience: int | None = MISSING
    restore_best: bool = MISSING


@dataclass
class SelectToleranceConfig:  # method.select=sparsest: how much worse than gates open an epoch may be
    ne: float = MISSING
    auc: float = MISSING
    confidence: float = MISSING


@dataclass
class SearchConfig:
    max_epochs: int | None = MISSING
    patience: int | None = MISSING
    patience_steps: int | None = MISSING
    monitor: str = MISSING
    search_monitor: str | None = MISSING
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    model_lr_scale: float = MISSING
    search_every: Any = MISSING  # an integer or 'auto'
    gate_steps_per_epoch: int = MISSING
    max_search_every: int = MISSING
    gate_data: str = MISSING
    holdout_fraction: float = MISSING
    search_batch_size: int | None = MISSING
    min_gate_steps: int = MISSING
    tolerance: SelectToleranceConfig = field(default_factory=SelectToleranceConfig)
    stop_when: str = MISSING
    ckpt: str | None = MISSING
    resume: str | None = MISSING


@dataclass
class RouterConfig:
    enabled: bool = MISSING
    features: str = MISSING
    max_rows: int = MISSING
    epochs: int = MISSING
    min_steps: int = MISSING
    lr: float = MISSING
    batch_size: int = MISSING
    weight_decay: Any = MISSING  # a number >= 0, or a list of them to choose from on validation


@dataclass
class ClusterConfig:
    k: int = MISSING
    batch_size: int = MISSING
    max_passes: int = MISSING
    tol: float = MISSING
    dir: str | None = MISSING
    min_cluster_size: int = MISSING
    input: str = MISSING
    router: RouterConfig = field(default_factory=RouterConfig)


@dataclass
class DeriveConfig:
    dir: str | None = MISSING


@dataclass
class RetrainConfig:
    max_epochs: int | None = MISSING
    patience: int | None = MISSING
    patience_steps: int | None = MISSING
    min_class_rows: int = MISSING
    monitor: str = MISSING
    init: str | None = MISSING
    guard: str | None = MISSING
    guard_confidence: float = MISSING
    keep_threshold: float = MISSING
    dir: str | None = MISSING


@dataclass
class EvaluateConfig:
    batch_size: int = MISSING
    timing_repeats: int = MISSING
    timing_rows: int = MISSING
    permutations: int = MISSING
    heterogeneity_rows: int = MISSING
    base_ckpt: str | None = MISSING


@dataclass
class ReportConfig:
    dir: str | None = MISSING
    out: str | None = MISSING
    table: str = MISSING


@dataclass
class PredictConfig:
    run: str | None = MISSING
    input: Any = MISSING  # a path or a list of paths
    output: str | None = MISSING
    model: str = MISSING
    routing: str = MISSING
    batch_size: int = MISSING
    passthrough: str | None = MISSING
    on_bad_rows: str = MISSING
    block_size_mb: float = MISSING
    progress: bool = MISSING


@dataclass
class ExportConfig:
    run: str | None = MISSING
    dir: str | None = MISSING
    model: str = MISSING
    routing: str = MISSING
    formats: list[str] = MISSING
    opset: int = MISSING
    tolerance: float = MISSING
    overwrite: bool = MISSING


@dataclass
class StageConfig:
    name: str = MISSING
    train_base: bool = True  # stage=all only: also train the Base row


@dataclass
class ModelConfig:
    name: str = MISSING
    backbone: str = MISSING
    backbone_args: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = MISSING
    hidden: list[int] = MISSING
    batchnorm: bool = MISSING
    dropout: float = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    batch_size: Any = MISSING  # an integer or 'auto'
    max_batch_size: int = MISSING
    min_batches_per_epoch: int = MISSING
    output_bias: str = MISSING
    embedding_optimizer: str = MISSING


@dataclass
class ArchOptimConfig:
    type: str = MISSING
    lr: float = MISSING
    weight_decay: float | None = MISSING


@dataclass
class MethodPretrainConfig:  # a method's override of search.pretrain (null: the stage's)
    max_epochs: int | None = None
    patience: int | None = None
    restore_best: bool | None = None


@dataclass
class RowsConfig:
    search: str | None = MISSING
    final: str | None = MISSING


@dataclass
class MethodConfig:
    name: str = MISSING
    display: str | None = MISSING
    gate: dict[str, Any] | None = None  # iHAS and its ablations (method.check_gate_cfg)
    selector: dict[str, Any] | None = MISSING  # the selector's constructor arguments
    arch_update: str | None = MISSING
    arch_optim: ArchOptimConfig = field(default_factory=ArchOptimConfig)
    embedding_optimizer: str | None = MISSING
    model_weight_decay: float | None = MISSING
    budget_from: str | None = MISSING
    search_every: Any = MISSING
    pretrain: MethodPretrainConfig | None = MISSING
    model_lr_scale: float | None = MISSING
    max_epochs: int | None = MISSING
    patience: int | None = MISSING
    search_monitor: str | None = MISSING
    early_stop: bool = MISSING
    select: str = MISSING
    objective: str = MISSING
    snapshots: list[str] = MISSING
    phases: list[str] = MISSING
    cluster_k: int | None = MISSING
    retrain_init: str | None = MISSING
    rewind_tag: str | None = MISSING
    retrain_guard: str | None = MISSING
    rows: RowsConfig = field(default_factory=RowsConfig)


@dataclass
class WandbConfig:
    project: str = MISSING
    entity: str | None = MISSING
    mode: str = MISSING
    group: str | None = MISSING
    tags: list[str] = MISSING
    save_dir: str = MISSING


@dataclass
class CsvConfig:
    save_dir: str = MISSING


@dataclass
class LoggerConfig:
    name: str = MISSING
    wandb: WandbConfig | None = None
    csv: CsvConfig | None = None


@dataclass
class Config:
    seed: int = MISSING
    tag: str = MISSING
    sweep_name: str = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    derive: DeriveConfig = field(default_factory=DeriveConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    transfer: dict[str, Any] = field(default_factory=dict)
    predict: PredictConfig = field(default_factory=PredictConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    dataset: dict[str, Any] = field(default_factory=dict)


def unknown_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Keys of schema nodes that the schema does not define. Hydra lets ``+model.lrr=1`` add a key to a
    typed node (it opens the node to append), so the composed config is checked once more."""
    from dataclasses import fields, is_dataclass

    from omegaconf import DictConfig, OmegaConf

    out: list[str] = []
    if not isinstance(cfg, DictConfig):
        return out
    typ = OmegaConf.get_type(cfg)
    known = {f.name for f in fields(typ)} if typ is not None and is_dataclass(typ) else None
    for k in cfg.keys():
        if known is not None and k not in known:
            out.append(f"{prefix}{k}")
        elif known is not None:
            out += unknown_keys(cfg._get_node(k), f"{prefix}{k}.")
    return out


def register() -> None:
    """Store the schema in Hydra's ConfigStore (idempotent); ``conf/config.yaml`` names it first."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)
