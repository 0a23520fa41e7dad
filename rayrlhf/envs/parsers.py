"""Reading tool calls out of an assistant turn's text (`env.tool_parser`).

A parser is `fn(text) -> list[ToolCall]`: an empty list means the turn calls no tool (its text is
the final answer); a malformed call raises ToolCallError, whose message the model reads back. To
add a format, write one such function and add one line to PARSERS.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


class ToolCallError(ValueError):
    """The text tries to call a tool but the call cannot be read; the message says why, for the model."""


_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def _call_from_json(raw: str, where: str) -> ToolCall:
    """{"name": str, "arguments": {...} or a JSON string of it} -> ToolCall."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ToolCallError(f"{where} is not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(obj, dict):
        raise ToolCallError(f"{where} must be a JSON object {{\"name\": ..., \"arguments\": {{...}}}}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ToolCallError(f"{where} has no \"name\" string")
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):  # some models send the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ToolCallError(f"{where}: \"arguments\" is a string that is not valid JSON ({exc.msg})") from None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ToolCallError(f"{where}: \"arguments\" must be a JSON object, got {type(arguments).__name__}")
    return ToolCall(name, arguments)


def parse_hermes(text: str) -> list[ToolCall]:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen2.5, Qwen3); several
    per turn. An opening tag left unclosed is a malformed call, not a final answer."""
    calls = [_call_from_json(block.strip(), f"tool call {i + 1}")
             for i, block in enumerate(_HERMES_BLOCK.findall(text))]
    rest = _HERMES_BLOCK.sub("", text)
    if "<tool_call>" in rest:
        raise ToolCallError("a <tool_call> is not closed with </tool_call>")
    return calls


PARSERS: dict[str, Callable[[str], list[ToolCall]]] = {
    "hermes": parse_hermes,
}


def get_parser(name: str) -> Callable[[str], list[ToolCall]]:
    try:
        return PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool parser {name!r}; known: {sorted(PARSERS)}") from None
