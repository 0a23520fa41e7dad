"""Tokenized examples for the offline algorithms: SFT demonstrations and preference pairs.

A response is trained on exactly as the online loop samples it: the prompt goes through the
chat template (`format_prompt`), the response follows it and ends with the tokenizer's EOS
token, so an SFT model learns to stop and a reward model scores the same token sequence a
rollout worker returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from rayrlhf.config import DataConfig
from rayrlhf.data.datasets import encode_prompt, format_prompt, load_rows
from rayrlhf.errors import InvalidInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One SFT row (`responses` has one entry) or one preference pair (chosen, rejected)."""

    prompt_ids: list[int]
    responses: tuple[list[int], ...]
    where: str


def encode_response(tokenizer: Any, text: str) -> list[int]:
    """Response token ids followed by EOS (no BOS: the response continues the prompt)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def load_examples(source: str, kind: str, tokenizer: Any, data: DataConfig) -> tuple[list[Example], int]:
    """Rows of `source` (kind "sft" or "pairs") tokenized; returns (examples, dropped).

    A prompt over `data.max_prompt_tokens` fails naming its row, or is dropped and counted
    (`data.overlong_prompts`). Pairs whose chosen and rejected texts are identical carry no
    preference and are dropped with a warning.
    """
    fields = ("response",) if kind == "sft" else ("chosen", "rejected")
    examples, overlong, ties = [], 0, 0
    for row in load_rows(source, kind):
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
        examples.append(Example(prompt, tuple(encode_response(tokenizer, row[f]) for f in fields), row["_where"]))
    if overlong:
        log.warning("%s: dropped %d rows whose prompt is over %d tokens", source, overlong, data.max_prompt_tokens)
    if ties:
        log.warning("%s: dropped %d pairs whose chosen and rejected responses are identical", source, ties)
    if not examples:
        raise InvalidInput(f"{source}: no usable rows (overlong prompts: {overlong}, identical pairs: {ties})")
    return examples, overlong + ties
