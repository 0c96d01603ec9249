"""Benchmarks: preprocessing, loader and training throughput (results in experiments/results/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_results(out: str | Path, res: dict[str, Any], md: str) -> None:
    """Write ``<out>.json`` (the numbers) and ``<out>.md`` (the table), print the table."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(res, indent=1) + "\n")
    Path(f"{out}.md").write_text(md)
    print(md)
