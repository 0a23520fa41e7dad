"""Data loading: formats, row checks that name file and line, overlong prompts, resumable order."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayrlhf.data.datasets import PromptDataset, load_prompts, load_rows, reward_columns
from rayrlhf.errors import InvalidInput
from rayrlhf.models.tiny import build_tokenizer


def jsonl(tmp_path: Path, rows: list, name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_and_parquet_read_the_same_rows(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "b", "chosen": "z", "rejected": "w"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    from_jsonl = load_rows(str(jsonl(tmp_path, rows)), "pairs")
    from_parquet = load_rows(str(tmp_path / "d.parquet"), "pairs")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "_where"} for r in rs]  # noqa: E731
    assert strip(from_jsonl) == strip(from_parquet) == rows


@pytest.mark.parametrize(
    ("rows", "kind", "pattern"),
    [
        ([{"prompt": "a", "response": "b"}, {"prompt": "c"}], "sft", r"d\.jsonl, line 2: missing field 'response'"),
        ([{"prompt": "a"}, {"prompt": ""}], "prompt", r"line 2: field 'prompt' is empty"),
        ([{"prompt": 3}], "prompt", r"line 1: field 'prompt' must be a string, got int"),
        (['{"prompt": "a"}', "{not json"], "prompt", r"line 2: not valid JSON"),
        (["[1, 2]"], "prompt", r"line 1: expected a JSON object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, rows: list, kind: str, pattern: str) -> None:
    with pytest.raises(InvalidInput, match=pattern):
        load_rows(str(jsonl(tmp_path, rows)), kind)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"), "prompt")


def test_prompts_use_the_chat_template_and_overlong_ones_error_or_drop(tmp_path: Path) -> None:
    tok = build_tokenizer()
    path = str(jsonl(tmp_path, [{"prompt": "ab", "answer": "ab"}, {"prompt": "x" * 40, "answer": "x"}]))
    with pytest.raises(InvalidInput, match=r"d\.jsonl, line 2: the prompt is 47 tokens, over data\.max_prompt_tokens = 20"):
        load_prompts(path, tok, 20, "error", apply_chat_template=True, seed=0)
    data = load_prompts(path, tok, 20, "drop", apply_chat_template=True, seed=0)
    assert len(data) == 1 and data.dropped == 1
    assert tok.decode(data.prompt_ids[0]) == "U: ab\nA: "
    assert reward_columns(data.rows) == {"answer": ["ab"]}


def test_order_is_seeded_reshuffled_per_epoch_and_resumable() -> None:
    rows = [{"prompt": str(i)} for i in range(5)]
    data = PromptDataset(rows, [[i] for i in range(5)], seed=7)
    first = data.next_batch(5)
    assert sorted(first) == list(range(5))
    second = data.next_batch(5)
    assert sorted(second) == list(range(5)) and second != first
    data2 = PromptDataset(rows, [[i] for i in range(5)], seed=7)
    assert data2.next_batch(3) + data2.next_batch(3) == first + second[:1]
    state = data2.state_dict()
    resumed = PromptDataset(rows, [[i] for i in range(5)], seed=7)
    resumed.load_state_dict(state)
    assert resumed.next_batch(4) == data2.next_batch(4)
