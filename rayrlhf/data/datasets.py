"""Datasets for every algorithm: jsonl, parquet or a Hugging Face dataset name, checked on load.

Rows are validated as they are read, and a bad row is an `InvalidInput` naming the file and
line (jsonl) or row (parquet, datasets) and what is wrong with it, never a traceback from the
middle of training.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayrlhf.errors import InvalidInput

log = logging.getLogger(__name__)

# Text fields each kind of job needs; every other column is kept (online RL passes them to the reward).
REQUIRED_FIELDS = {
    "prompt": ("prompt",),
    "sft": ("prompt", "response"),
    "pairs": ("prompt", "chosen", "rejected"),
    "text": ("text",),
}


def _read_rows(source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (where, row) from a jsonl or parquet file or a `datasets` name (split after '@', default train)."""
    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".parquet") and not path.is_file():
        raise InvalidInput(f"{source}: data file does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{source}, row {number}", row
    elif path.suffix in (".jsonl", ".json") or path.is_file():
        with path.open() as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidInput(f"{source}, line {number}: not valid JSON ({exc.msg})") from None
                yield f"{source}, line {number}", row
    else:
        try:
            import datasets
        except ImportError:
            raise InvalidInput(f"{source}: not a .jsonl/.parquet file, and the `datasets` package is not installed") from None
        name, _, split = source.partition("@")
        try:
            table = datasets.load_dataset(name, split=split or "train")
        except Exception as exc:
            raise InvalidInput(f"{source}: cannot load dataset ({exc})") from None
        for number, row in enumerate(table, start=1):
            yield f"{source}, row {number}", dict(row)


def load_rows(source: str, kind: str) -> list[dict[str, Any]]:
    """All rows of `source`, each checked to have non-empty string fields for `kind`."""
    required = REQUIRED_FIELDS[kind]
    rows = []
    for where, row in _read_rows(source):
        if not isinstance(row, dict):
            raise InvalidInput(f"{where}: expected a JSON object with fields {', '.join(required)}")
        for name in required:
            if name not in row:
                raise InvalidInput(f"{where}: missing field '{name}' (rows need {', '.join(required)})")
            if not isinstance(row[name], str):
                raise InvalidInput(f"{where}: field '{name}' must be a string, got {type(row[name]).__name__}")
            if name != "response" and not row[name].strip():
                raise InvalidInput(f"{where}: field '{name}' is empty")
        row["_where"] = where
        rows.append(row)
    if not rows:
        raise InvalidInput(f"{source}: no rows")
    return rows


def format_prompt(tokenizer: Any, prompt: str, apply_chat_template: bool) -> str:
    """The prompt as the model sees it: wrapped in the tokenizer's chat template when it has one."""
    if apply_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of an already formatted prompt (a chat template adds its own special tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class PromptDataset:
    """Prompts for online RL, tokenized once, served in a seeded shuffled order per epoch.

    The position (epoch, index) is part of the orchestrator's checkpoint, so a resumed run
    takes the same prompts in the same order as an uninterrupted one.
    """

    rows: list[dict[str, Any]]
    prompt_ids: list[list[int]]
    seed: int
    shuffle: bool = True
    dropped: int = 0
    epoch: int = 0
    index: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._order = self._epoch_order(self.epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed * 100003 + epoch).shuffle(order)
        return order

    def __len__(self) -> int:
        return len(self.rows)

    def next_batch(self, n: int) -> list[int]:
        """Indices of the next `n` prompts, crossing into the next epoch (reshuffled) when needed."""
        out = []
        while len(out) < n:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            out.append(self._order[self.index])
            self.index += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order(self.epoch)


def load_prompts(
    source: str, tokenizer: Any, max_prompt_tokens: int, overlong: str, apply_chat_template: bool, seed: int,
    shuffle: bool = True,
) -> PromptDataset:
    """Read and tokenize the prompts of `source`; an overlong prompt is an error naming it, or dropped and counted."""
    rows, prompt_ids, dropped = [], [], 0
    for row in load_rows(source, "prompt"):
        ids = encode_prompt(tokenizer, format_prompt(tokenizer, row["prompt"], apply_chat_template))
        if len(ids) > max_prompt_tokens:
            if overlong == "error":
                raise InvalidInput(
                    f"{row['_where']}: the prompt is {len(ids)} tokens, over data.max_prompt_tokens = {max_prompt_tokens} "
                    "(raise it, or set data.overlong_prompts: drop)"
                )
            dropped += 1
            continue
        rows.append(row)
        prompt_ids.append(ids)
    if dropped:
        log.warning("%s: dropped %d prompts longer than %d tokens", source, dropped, max_prompt_tokens)
    if not rows:
        raise InvalidInput(f"{source}: every prompt is longer than data.max_prompt_tokens = {max_prompt_tokens}")
    return PromptDataset(rows, prompt_ids, seed=seed, shuffle=shuffle, dropped=dropped)


def reward_columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The non-prompt columns of `rows`, as lists, for a reward function's keyword arguments."""
    names = [k for k in rows[0] if k not in ("prompt", "_where")] if rows else []
    return {k: [r.get(k) for r in rows] for k in names}
