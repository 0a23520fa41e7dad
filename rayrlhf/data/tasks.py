"""Writing task data as JSON lines (the `sort` task's data itself is made by `rayrlhf.data.demo_data`)."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows as JSON lines, creating the parent folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return out
