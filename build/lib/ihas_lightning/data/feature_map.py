"""The feature map: metadata saved beside the prepared Parquet files (as FuxiCTR does).

A prepared directory holds::

    train.parquet  val.parquet  test.parquet   # one int32 column per field + int8 ``label``
    feature_map.json                           # this file
    truth.json                                 # synthetic data only: the planted ground truth

Id layout, per field: ``0`` is the field's OOV id (tokens seen fewer than ``min_count`` times in
the training split, and every token never seen in training); kept tokens get ids ``1..V-1`` in a
deterministic order (count descending, then token ascending). ``vocab_size`` counts the OOV id, so
every id of a field lies in ``[0, vocab_size)``. Models are built from the feature map alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..utils import read_json, write_json

FEATURE_MAP = "feature_map.json"
SPLITS = ("train", "val", "test")
LABEL = "label"
OOV_ID = 0
FORMAT_VERSION = 1


@dataclass
class Field:
    name: str
    vocab_size: int  # includes the OOV id 0
    kind: str = "categorical"  # "categorical" | "numeric" (numeric = discretized into tokens)
    oov_id: int = OOV_ID


@dataclass
class FeatureMap:
    dataset: str
    fields: list[Field]
    min_count: int | dict[str, int] = 10
    transforms: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> {rows, pos_rate, file}
    row_group_size: int = 0
    config_hash: str = ""
    input_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    # ---- derived -------------------------------------------------------------------------
    @property
    def num_fields(self) -> int:
        return len(self.fields)

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def vocab_sizes(self) -> list[int]:
        return [f.vocab_size for f in self.fields]

    def rows(self, split: str) -> int:
        return int(self.splits[split]["rows"])

    # ---- I/O -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label"] = LABEL
        d["num_fields"] = self.num_fields
        d["total_vocab"] = int(sum(self.vocab_sizes))
        return d

    def save(self, directory: str | Path) -> None:
        write_json(Path(directory) / FEATURE_MAP, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureMap:
        return cls(
            dataset=d["dataset"],
            fields=[Field(**f) for f in d["fields"]],
            min_count=d.get("min_count", 10),
            transforms=d.get("transforms", {}),
            splits=d.get("splits", {}),
            row_group_size=d.get("row_group_size", 0),
            config_hash=d.get("config_hash", ""),
            input_hash=d.get("input_hash", ""),
            extra=d.get("extra", {}),
            version=d.get("version", FORMAT_VERSION),
        )

    @classmethod
    def load(cls, directory: str | Path) -> FeatureMap:
        path = Path(directory) / FEATURE_MAP
        if not path.is_file():
            raise DataError(
                f"{path}: no feature map; this is not a prepared dataset directory "
                "(run stage=prepare first, or point dataset.prepared_dir at one)"
            )
        try:
            return cls.from_dict(read_json(path))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: malformed feature map ({e})") from e


def is_complete(directory: str | Path) -> bool:
    """A prepared dir is complete when its feature map and all three split files exist.

    Prepared dirs are only ever created by an atomic rename, so this is enough."""
    d = Path(directory)
    return (d / FEATURE_MAP).is_file() and all((d / f"{s}.parquet").is_file() for s in SPLITS)
