"""Tokenized examples for the offline algorithms: SFT demonstrations and preference pairs.

A response is trained on exactly as the online loop samples it: the prompt goes through the
chat template (`format_prompt`), the response follows it and ends with the tokenizer's EOS
token, so an SFT model learns to stop and a reward model scores the same token sequence a
rollout worker returns.

An SFT conversation (`messages`) is tokenized as a rollout would sample it (`chat.ChatFormat.
conversation_ids`) and trained on its assistant turns only: the example's "prompt" is everything
before the first assistant token, its "response" the rest up to the last assistant token, and
`loss_mask` zeroes the user, tool and template tokens in between.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from rayrlhf.config import DataConfig
from rayrlhf.data.chat import chat_format
from rayrlhf.data.datasets import encode_prompt, format_prompt, load_rows, row_prompt_ids
from rayrlhf.errors import InvalidInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One SFT row (`responses` has one entry) or one preference pair (chosen, rejected)."""

    prompt_ids: list[int]
    responses: tuple[list[int], ...]
    where: str
    loss_mask: list[int] | None = None  # SFT conversations: 1 on the response tokens trained on (None: all)


def encode_response(tokenizer: Any, text: str) -> list[int]:
    """Response token ids followed by EOS (no BOS: the response continues the prompt)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def conversation_example(row: dict[str, Any], tokenizer: Any, apply_chat_template: bool) -> Example:
    """An SFT conversation row as one example trained on its assistant turns only."""
    try:
        ids, mask = chat_format(tokenizer, apply_chat_template).conversation_ids(row["messages"], row.get("tools"))
    except InvalidInput as exc:
        raise InvalidInput(f"{row['_where']}: {exc}") from None
    first = mask.index(1)
    last = len(mask) - mask[::-1].index(1)
    return Example(ids[:first], (ids[first:last],), row["_where"], mask[first:last])


def load_examples(source: str, kind: str, tokenizer: Any, data: DataConfig) -> tuple[list[Example], int]:
    """Rows of `source` (kind "sft" or "pairs") tokenized; returns (examples, dropped).

    A prompt over `data.max_prompt_tokens` fails naming its row, or is dropped and counted
    (`data.overlong_prompts`). Pairs whose chosen and rejected texts are identical carry no
    preference and are dropped with a warning.
    """
    fields = ("response",) if kind == "sft" else ("chosen", "rejected")
    examples, overlong, ties = [], 0, 0
    for row in load_rows(source, kind, data.prompt_key, data.messages_key):
        if row.get("messages") is not None:
            example = conversation_example(row, tokenizer, data.apply_chat_template)
            prompt = example.prompt_ids
        elif kind == "sft":
            prompt = row_prompt_ids(row, tokenizer, data.apply_chat_template)
        else:
            prompt = encode_prompt(tokenizer, format_prompt(tokenizer, row["prompt"], data.apply_chat_template))
        if len(prompt) > data.max_prompt_tokens:
            if data.overlong_prompts == "error":
                raise InvalidInput(
                    f"{row['_where']}: the prompt is {len(prompt)} tokens, over data.max_prompt_tokens = "
                    f"{data.max_prompt_tokens} (raise it, or set data.overlong_prompts: drop)"
                )
            overlong += 1
            continue
        if kind == "pairs" and row["chosen"] == row["rejected"]:
            ties += 1
            continue
        if row.get("messages") is None:
            example = Example(prompt, tuple(encode_response(tokenizer, row[f]) for f in fields), row["_where"])
        examples.append(example)
    if overlong:
        log.warning("%s: dropped %d rows whose prompt is over %d tokens", source, overlong, data.max_prompt_tokens)
    if ties:
        log.warning("%s: dropped %d pairs whose chosen and rejected responses are identical", source, ties)
    if not examples:
        raise InvalidInput(f"{source}: no usable rows (overlong prompts: {overlong}, identical pairs: {ties})")
    return examples, overlong + ties
