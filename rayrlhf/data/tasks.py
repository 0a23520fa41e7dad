"""Small verifiable tasks for tests, the shipped local configs and the demo.

`sort`: the prompt is `sort: <letters>` and the correct response is the same letters in
alphabetical order. A reward function checks the answer, so the task needs no labeller and
the reward is exact. Rows carry the `answer` column, which reaches reward functions as a
keyword argument (the DESIGN.md reward-function contract).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LETTERS = "abcdefgh"


def sort_rows(n: int, seed: int, min_len: int = 3, max_len: int = 5) -> list[dict[str, str]]:
    """`n` prompts of the sort task with their answers, reproducible from `seed`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        letters = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))
        rows.append({"prompt": f"sort: {letters}", "answer": "".join(sorted(letters))})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows as JSON lines, creating the parent folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return out
