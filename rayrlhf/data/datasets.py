"""Datasets for every algorithm: jsonl, parquet or a Hugging Face dataset, checked on load.

Rows are validated as they are read, and a bad row is an `InvalidInput` naming the file and
line (jsonl) or row (parquet, datasets) and what is wrong with it, never a traceback from the
middle of training. Prompt and SFT rows are a prompt (`data.prompt_key`) or a conversation
(`data.messages_key`, see `rayrlhf.data.chat`); inside the code they are always `prompt` and
`messages`.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayrlhf.data.chat import chat_format, check_messages, check_tools, prompt_text
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
    """Yield (where, row) from a jsonl or parquet file, or a Hugging Face dataset (see `_dataset_rows`)."""
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
        for number, row in enumerate(_dataset_rows(source), start=1):
            yield f"{source}, row {number}", dict(row)


_SAVED_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")  # what save_to_disk writes


def _dataset_rows(source: str) -> Any:
    """A Hugging Face dataset: `name`, `name@split`, `name:config@split` (the hub, or a local folder of data
    files), or a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (`folder@split`).
    The split defaults to `train` (or a DatasetDict's only split)."""
    try:
        import datasets
    except ImportError:
        raise InvalidInput(f"{source}: not a .jsonl/.parquet file, and the `datasets` package is not installed") from None
    base, split = (source.rsplit("@", 1) + [""])[:2] if "@" in source else (source, "")
    folder = Path(base).expanduser()
    if folder.is_dir() and any((folder / m).is_file() for m in _SAVED_MARKERS):
        try:
            saved = datasets.load_from_disk(str(folder))
        except Exception as exc:  # noqa: BLE001 - corrupt or foreign folder: say which
            raise InvalidInput(f"{source}: cannot load the saved dataset ({type(exc).__name__}: {exc})") from None
        if isinstance(saved, datasets.DatasetDict):
            splits = sorted(saved)
            if not split:
                split = "train" if "train" in saved else (splits[0] if len(splits) == 1 else "")
            if split not in saved:
                raise InvalidInput(f"{source}: no split {split!r} in this DatasetDict; its splits are {splits} "
                                   f"(name one as {base}@SPLIT)")
            return saved[split]
        if split:
            raise InvalidInput(f"{source}: {base} holds a single Dataset, which has no splits (drop '@{split}')")
        return saved
    name, _, config = base.partition(":")
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise InvalidInput(f"{source}: no such file or dataset folder")
    try:
        return datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - not found, no network, bad config or split: all mean "cannot load"
        raise InvalidInput(f"{source}: cannot load dataset ({type(exc).__name__}: {exc})") from None


def _rename(row: dict[str, Any], where: str, key: str, canonical: str, setting: str) -> None:
    """Move column `key` to its canonical name (`prompt`, `messages`) that the rest of the code reads."""
    if key == canonical:
        return
    if canonical in row:
        raise InvalidInput(f"{where}: has a column '{canonical}' while {setting} is {key!r}; rename that column")
    if key in row:
        row[canonical] = row.pop(key)


def _conversation(row: dict[str, Any], where: str, kind: str, prompt_key: str, messages_key: str) -> None:
    """Check a conversation row in place: `messages` (and `tools`) checked and normalised, `prompt` set to
    the text a reward function gets (`chat.prompt_text`)."""
    for name, shown in (("prompt", prompt_key), ("response", "response"))[: 2 if kind == "sft" else 1]:
        if row.get(name) is not None:
            raise InvalidInput(f"{where}: has both '{messages_key}' and '{shown}'; a row holds one or the other")
    messages = check_messages(row["messages"], where, messages_key, prompt=kind == "prompt")
    if kind == "sft" and not any(m["role"] == "assistant" for m in messages):
        raise InvalidInput(f"{where}: '{messages_key}' has no assistant message to train on")
    if kind == "sft" and messages[0]["role"] == "assistant":
        raise InvalidInput(f"{where}: '{messages_key}' starts with an assistant message; it needs a system or user "
                           "message before it")
    row.pop("response", None)
    row["messages"], row["prompt"] = messages, prompt_text(messages)


def load_rows(source: str, kind: str, prompt_key: str = "prompt", messages_key: str = "messages") -> list[dict[str, Any]]:
    """All rows of `source`, each checked to have non-empty string fields for `kind`.

    The prompt column is `prompt_key` (renamed `prompt` in the rows returned). Prompt and SFT rows
    may hold a conversation in `messages_key` (renamed `messages`) instead, and either may carry
    `tools` (tool schemas); a conversation row's `prompt` is set to the text a reward function gets
    (its last user message). Null counts as absent: columnar formats (parquet, datasets) write
    null where a row lacks a column that others have.
    """
    required = REQUIRED_FIELDS[kind]
    conversations = kind in ("prompt", "sft")
    needs = ", ".join(prompt_key if name == "prompt" else name for name in required)
    if conversations:
        needs = f"{needs}, or {messages_key}"
    rows = []
    for where, row in _read_rows(source):
        if not isinstance(row, dict):
            raise InvalidInput(f"{where}: expected a JSON object with fields {needs}")
        if "prompt" in required:
            _rename(row, where, prompt_key, "prompt", "data.prompt_key")
        if conversations:
            _rename(row, where, messages_key, "messages", "data.messages_key")
        if conversations and row.get("messages") is not None:
            _conversation(row, where, kind, prompt_key, messages_key)
        else:
            if conversations:
                row.pop("messages", None)
            for name in required:
                shown = prompt_key if name == "prompt" else name
                if row.get(name) is None:
                    raise InvalidInput(f"{where}: missing field '{shown}' (rows need {needs})")
                if not isinstance(row[name], str):
                    raise InvalidInput(f"{where}: field '{shown}' must be a string, got {type(row[name]).__name__}")
                if name != "response" and not row[name].strip():
                    raise InvalidInput(f"{where}: field '{shown}' is empty")
        if conversations:
            if row.get("tools") is not None:
                row["tools"] = check_tools(row["tools"], where)
            else:
                row.pop("tools", None)
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


def row_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation of a checked row: its `messages`, or its `prompt` as one user message."""
    return row["messages"] if row.get("messages") is not None else [{"role": "user", "content": row["prompt"]}]


def row_prompt_ids(row: dict[str, Any], tokenizer: Any, apply_chat_template: bool, tools: list[dict] | None = None) -> list[int]:
    """Prompt ids of a checked row. A plain prompt without tools is `format_prompt` as before; a
    conversation, or a prompt with tools (the row's `tools`, else `tools`), goes through `chat.ChatFormat`.
    Errors name the row."""
    tools = row.get("tools") or tools
    if row.get("messages") is None and not tools:
        return encode_prompt(tokenizer, format_prompt(tokenizer, row["prompt"], apply_chat_template))
    try:
        return chat_format(tokenizer, apply_chat_template).prompt_ids(row_messages(row), tools)
    except InvalidInput as exc:
        raise InvalidInput(f"{row['_where']}: {exc}") from None


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
    shuffle: bool = True, prompt_key: str = "prompt", messages_key: str = "messages", tools: list[dict] | None = None,
) -> PromptDataset:
    """Read and tokenize the prompts of `source`; an overlong prompt is an error naming it, or dropped and counted.

    Rows are prompts or conversations (`load_rows`); `tools` are the schemas shown to rows without a
    `tools` column of their own (an environment's tools).
    """
    rows, prompt_ids, dropped = [], [], 0
    for row in load_rows(source, "prompt", prompt_key, messages_key):
        ids = row_prompt_ids(row, tokenizer, apply_chat_template, tools)
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
    # One set of columns for every row (null where a row lacks one): a reward function gets the same
    # keyword arguments whichever rows a batch holds, e.g. `messages` in a file mixing prompts and conversations.
    columns = dict.fromkeys(k for row in rows for k in row)
    rows = [{k: row.get(k) for k in columns} for row in rows]
    return PromptDataset(rows, prompt_ids, seed=seed, shuffle=shuffle, dropped=dropped)


def reward_columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The non-prompt columns of `rows`, as lists, for a reward function's keyword arguments."""
    names = [k for k in rows[0] if k not in ("prompt", "_where")] if rows else []
    return {k: [r.get(k) for r in rows] for k in names}
