"""The built-in tool environment (`env.tools: path/to/file.py:TOOLS`) and the shipped `python` tool.

An episode with tools: the assistant writes a turn; if it calls tools (read by env.tool_parser),
each call runs in a tool process (runner.py) and comes back as one {"role": "tool", "name", "content"}
message, and the assistant goes on; a turn without a tool call is the final answer and ends the
episode. Turn rewards are 0: the score comes from the reward function or model on the transcript.
A call that cannot run (malformed, unknown tool, wrong arguments, the tool raised or timed out)
comes back as an "error: ..." message the model can react to, and is counted in info["tool_errors"].
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from rayrlhf.envs.parsers import ToolCall, ToolCallError, get_parser
from rayrlhf.envs.runner import ToolFailed, ToolRunner, ToolTimeout, format_result, load_tools
from rayrlhf.envs.sandbox import make_python_tool, run_python
from rayrlhf.envs.schema import check_arguments, function_schema, tool_schemas

__all__ = [
    "PYTHON_TOOLS", "ToolEnv", "check_arguments", "format_result", "function_schema", "load_tools",
    "make_python_tool", "python", "run_python", "tool_schemas",
]

python = make_python_tool()
PYTHON_TOOLS = [python]  # env.tools: rayrlhf.envs.tools:PYTHON_TOOLS

STEP_MARGIN_S = 0.5  # kept free at the end of a step for the answer to travel back

_runners: dict[tuple, ToolRunner] = {}
_tools: dict[str, tuple[dict[str, Callable[..., Any]], dict[str, dict]]] = {}
_cache_lock = threading.Lock()


def _tool_table(spec: str) -> tuple[dict[str, Callable[..., Any]], dict[str, dict]]:
    """The functions and schemas of a tool list, loaded once per process (episodes share them)."""
    with _cache_lock:
        if spec not in _tools:
            functions = load_tools(spec)
            schemas = tool_schemas(functions)
            _tools[spec] = ({s["function"]["name"]: f for s, f in zip(schemas, functions)},
                            {s["function"]["name"]: s for s in schemas})
        return _tools[spec]


def _runner(spec: str, timeout_s: float, memory_limit_mb: int | None, processes: int) -> ToolRunner:
    key = (spec, timeout_s, memory_limit_mb, processes)
    with _cache_lock:
        if key not in _runners:
            _runners[key] = ToolRunner(spec, timeout_s, memory_limit_mb, processes)
        return _runners[key]


class ToolEnv:
    """Runs the tool calls of each assistant turn; the env.tool* settings arrive as constructor arguments,
    and env.kwargs may set `processes` (tool processes per host), `max_calls_per_turn`, `max_result_chars`."""

    def __init__(self, tools: str, parser: str = "hermes", tool_timeout_s: float = 15.0,
                 memory_limit_mb: int | None = 4096, step_timeout_s: float | None = None, processes: int = 4,
                 max_calls_per_turn: int = 8, max_result_chars: int = 8192) -> None:
        self.functions, self.schemas = _tool_table(tools)
        self.parse = get_parser(parser)
        self.tool_timeout_s, self.step_timeout_s = tool_timeout_s, step_timeout_s
        self.max_calls_per_turn, self.max_result_chars = max_calls_per_turn, max_result_chars
        self.runner = _runner(tools, tool_timeout_s, memory_limit_mb, processes)

    @property
    def tool_schemas(self) -> list[dict]:
        return list(self.schemas.values())

    def reset(self, row: dict) -> None:
        """Nothing to add: the row's prompt or messages (and the tools' schemas) are rendered by the rollout."""
        return None

    def step(self, action: str) -> tuple[list[dict] | None, float, bool, dict[str, int]]:
        started = time.monotonic()
        deadline = started + self.step_timeout_s - STEP_MARGIN_S if self.step_timeout_s else None
        try:
            calls = self.parse(action)
        except ToolCallError as exc:
            return [{"role": "tool", "content": f"error: {exc}"}], 0.0, False, {"tool_calls": 1, "tool_errors": 1}
        if not calls:
            return None, 0.0, True, {"tool_calls": 0, "tool_errors": 0}
        messages, errors = [], 0
        for i, call in enumerate(calls):
            if i >= self.max_calls_per_turn:
                ok, content = False, f"error: not run: at most {self.max_calls_per_turn} tool calls per turn"
            else:
                ok, content = self.run_call(call, deadline)
            errors += not ok
            messages.append({"role": "tool", "name": call.name, "content": content})
        return messages, 0.0, False, {"tool_calls": len(calls), "tool_errors": errors}

    def run_call(self, call: ToolCall, deadline: float | None = None) -> tuple[bool, str]:
        """(ok, what the model reads) for one call."""
        schema = self.schemas.get(call.name)
        if schema is None:
            return False, f"error: unknown tool {call.name!r}; available tools: {', '.join(self.schemas)}"
        problem = check_arguments(schema, call.arguments)
        if problem:
            return False, f"error: {problem}"
        timeout = self.tool_timeout_s
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                return False, f"error: tool {call.name!r} not run: this turn's time (env.step_timeout_s) is used up"
        try:
            result = self.runner.call(call.name, call.arguments, timeout)
        except ToolTimeout:
            return False, f"error: tool {call.name!r} timed out after {timeout:g}s"
        except ToolFailed as exc:
            return False, f"error: {exc}"
        if len(result) > self.max_result_chars:
            result = result[: self.max_result_chars] + f"\n[result truncated: {len(result)} characters in all]"
        return True, result
