"""The driver's side of multi-turn episodes: what a request carries, what the reward sees, where turns stop.

The turns themselves run in the rollout workers (rayrlhf/actors/episodes.py); the environments in child
processes beside them or in env actors (rayrlhf/envs/). Here: the `EpisodeSpec` of a data row, the stop
tokens of every turn (the chat template's end-of-turn token beside the tokenizer's EOS), and the reward
inputs of finished episodes: the row's prompt and columns, the whole transcript after the first prompt as
the response, and the turns as messages in a `transcript` column.
"""

from __future__ import annotations

from typing import Any

from rayrlhf.actors.types import Completion, EpisodeSpec
from rayrlhf.config import JobConfig
from rayrlhf.data.datasets import reward_columns, row_messages

TRANSCRIPT = "transcript"  # the reward functions' keyword for an episode's turns


def episode_spec(cfg: JobConfig, row: dict[str, Any], tools: list[dict] | None) -> EpisodeSpec | None:
    """The episode a data row starts (None for single-turn jobs): the row for the environment's reset (every
    column but the loader's bookkeeping), its conversation, the tools shown (the row's own, else the env's)."""
    if not cfg.env.enabled:
        return None
    return EpisodeSpec(row={k: v for k, v in row.items() if k != "_where"}, messages=row_messages(row),
                       tools=row.get("tools") or tools, max_turns=cfg.env.max_turns, max_total_tokens=cfg.max_total_tokens)


def stop_token_ids(tokenizer: Any, apply_chat_template: bool) -> tuple[int, ...]:
    """Where a turn ends: EOS, and the chat template's end-of-turn token where it has one of its own (a ChatML
    model ends an assistant message with <|im_end|>, which need not be its EOS)."""
    from rayrlhf.data.chat import chat_format

    ids = [tokenizer.eos_token_id, chat_format(tokenizer, apply_chat_template).eot_id]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def transcript(c: Completion) -> list[dict[str, str]] | None:
    """An episode's turns after the first prompt, as messages (None for a single response)."""
    if c.turns is None:
        return None
    return [{"role": t["role"], "content": t["text"]} for t in c.turns]


def reward_inputs(batch: list[Completion], rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, list]]:
    """(prompts, columns) for a reward function: the rows' prompts and other columns, plus `transcript` for episodes."""
    columns = reward_columns(rows)
    if any(c.turns is not None for c in batch):
        columns[TRANSCRIPT] = [transcript(c) for c in batch]
    return [r["prompt"] for r in rows], columns
