"""metrics.jsonl and the terminal progress bar."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends one JSON object per step to `metrics.jsonl`, flushed at once so nothing is lost on a crash.

    On resume the rows after the checkpoint's step are dropped first, so the file reads like
    one uninterrupted run.
    """

    def __init__(self, path: Path, resume_from_step: int | None = None) -> None:
        self.path = path
        if resume_from_step is not None and path.exists():
            self._keep_until(resume_from_step)
        elif resume_from_step is None and path.exists():
            path.unlink()
        self._fh = path.open("a")

    def _keep_until(self, step: int) -> None:
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def truncate(self, step: int) -> None:
        """Drop the rows after `step` (the run went back to the checkpoint of `step`)."""
        self._fh.close()
        self._keep_until(step)
        self._fh = self.path.open("a")

    def write(self, row: dict[str, Any]) -> None:
        row = {**row, "time": row.get("time", time.time())}  # wall clock (Unix seconds) when the row was written
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def progress(total: int, initial: int, desc: str):
    """A tqdm bar on a terminal; None when stderr is not a TTY (logs then carry the progress)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
