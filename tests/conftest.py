"""Shared fixtures. Tests compose the real Hydra config (pinned to CPU, tiny sizes, tmp dirs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("IHAS_SHARED_DIR", REPO.parent / "shared"))


def shared_file(*parts: str) -> Path:
    """Path of a file under ../shared; skips the test with a clear reason when it is absent."""
    p = shared_dir().joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not available: {p} is missing (set IHAS_SHARED_DIR to the shared/ folder)")
    return p


#: the smallest budgets that still run every phase of stage=all (one epoch each, a gate step every 2
#: batches, one timing repeat): the test files add their own data size and batch sizes
FAST_FITS = [
    "search.max_epochs=1",
    "search.pretrain.max_epochs=1",
    "search.pretrain.patience=null",
    "search.search_every=2",
    "retrain.max_epochs=1",
    "evaluate.timing_repeats=1",
]

CRITEO_DIR = ("data", "criteo", "Lapis-Hong_Wide-ResDNN")
AVAZU_DIR = ("data", "avazu", "Lapis-Hong_Wide-ResDNN")


@pytest.fixture
def criteo_raw() -> dict[str, Path]:
    """The real Criteo sample (tab-separated, no header): train/dev/test files."""
    return {
        s: shared_file(*CRITEO_DIR, f"{f}.csv")
        for s, f in (("train", "train"), ("val", "dev"), ("test", "test"))
    }


@pytest.fixture
def avazu_raw() -> dict[str, Path]:
    """The real Avazu sample (CSV with header): train/dev/test files."""
    return {
        s: shared_file(*AVAZU_DIR, f"{f}.csv")
        for s, f in (("train", "train"), ("val", "dev"), ("test", "test"))
    }


@pytest.fixture
def cfg_factory(tmp_path):
    """compose(overrides) -> DictConfig with paths.data_dir / output_dir under tmp_path and csv logging."""
    from ihas_lightning.config import compose

    def make(*overrides: str, output_dir: Path | None = None):
        out = output_dir or (tmp_path / "run")
        out.mkdir(parents=True, exist_ok=True)
        base = [
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.log_dir={tmp_path / 'logs'}",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            "prepare.progress=false",
        ]
        return compose(base + list(overrides), output_dir=out)

    return make


# tiny settings for tests that run real pipeline stages (search -> cluster -> retrain)
FAST_STAGES = [
    "dataset.rows=4000",
    "search.max_epochs=1",
    "search.pretrain.max_epochs=1",
    "search.pretrain.patience=null",
    "search.search_every=2",
    "retrain.max_epochs=1",
    "cluster.min_cluster_size=50",
    "cluster.batch_size=1024",
    "model.batch_size=512",
]


def stage_cfg_factory(root: Path):
    """``make(*overrides, out=None)`` composing a tiny-stage config under ``root`` (run dir root/run)."""
    from ihas_lightning.config import compose

    def make(*overrides: str, out: Path | None = None):
        base = [
            f"paths.data_dir={root / 'data'}",
            f"paths.log_dir={root / 'logs'}",
            "logger=none",
            "trainer.enable_progress_bar=false",
            *FAST_STAGES,
        ]
        return compose(base + list(overrides), output_dir=out or root / "run")

    return make


def stage_all(root: Path, *overrides: str) -> tuple[Path, Path]:
    """``stage=all`` into ``root/run`` (data under ``root/data``, no logger): (run dir, prepared dir).
    For module-scoped fixtures that share one trained run across tests."""
    from ihas_lightning import pipeline
    from ihas_lightning.config import compose

    cfg = compose([f"paths.data_dir={root / 'data'}", "logger=none", "trainer.enable_progress_bar=false",
                   "prepare.progress=false", "stage=all", *overrides], output_dir=root / "run")  # fmt: skip
    pipeline.run(cfg)
    return root / "run", Path(str(cfg.dataset.prepared_dir))
