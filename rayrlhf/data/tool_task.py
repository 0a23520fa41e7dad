"""The `box` task: a multi-turn task a tiny model learns on CPU, and only with its tool.

Each prompt asks what is in a box; each row has its own random content (three hex digits), so no model can
know it: the only way to score is to call the `open_box` tool, read what it returns, and answer with it:

    U: what is in box 412?
    A: <tool_call>{"name":"open_box","arguments":{}}</tool_call>
    T: 3fa
    A: 3fa

The environment (`BoxEnv`) reads the policy's tool calls in the Hermes/Qwen format with the project's own
parser, answers a well-formed `open_box` call with the row's content and anything else with an error message,
and ends the episode at the first turn without a tool call (the answer). SFT on a few hundred demonstrations
teaches the format; GRPO then raises the share of episodes that open the box and copy its content
(`reward/mean`, `env/tool_calls_mean`, `env/tool_errors`). The reward (`rayrlhf.rewards.tasks:tool_answer`)
gives half for a successful `open_box` call and half for the answer, by the share of its characters right.

`python -m rayrlhf.data.tool_task DIR` writes the data that cluster_configs/local-cpu/tool_*.yaml use.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from rayrlhf.data.tasks import write_jsonl

OPEN_BOX = {"type": "function", "function": {
    "name": "open_box", "description": "Open the box and read what is in it.",
    "parameters": {"type": "object", "properties": {}, "required": []}}}
CALL = "<tool_call>" + json.dumps({"name": "open_box", "arguments": {}}, separators=(",", ":")) + "</tool_call>"


class BoxEnv:
    """One episode of the box task: `open_box` returns the row's `answer`; the first turn without a tool call
    is the answer and ends the episode (the reward function scores it from the transcript)."""

    def reset(self, row: dict) -> None:
        self.content = str(row["answer"])

    def step(self, action: str) -> tuple:
        """(observation, reward, done, info): info counts tool calls and errors for env/tool_calls_mean, env/tool_errors."""
        from rayrlhf.envs.parsers import ToolCallError, parse_hermes

        try:
            calls = parse_hermes(action)
        except ToolCallError as exc:
            return [{"role": "tool", "name": "open_box", "content": f"error: {exc}"}], 0.0, False, {"tool_errors": 1}
        if not calls:
            return None, 0.0, True
        replies = [self.content if call.name == "open_box" else f"error: no tool named {call.name!r}" for call in calls]
        info = {"tool_calls": len(calls), "tool_errors": sum(r.startswith("error:") for r in replies)}
        return [{"role": "tool", "name": c.name, "content": r} for c, r in zip(calls, replies, strict=True)], 0.0, False, info


def write_tool_task(folder: str | Path, n_train: int = 400, n_eval: int = 40, n_demos: int = 256,
                    seed: int = 0) -> dict[str, Path]:
    """Prompt rows for GRPO (train) and evaluation, and SFT demonstrations (loss on the assistant turns), each
    row with its own random content and the tool's schema."""
    rng = random.Random(seed)

    def row() -> dict:
        return {"prompt": f"what is in box {rng.randrange(1000)}?", "answer": f"{rng.randrange(4096):03x}",
                "tools": [OPEN_BOX]}

    def demo() -> dict:
        r = row()
        return {"tools": r["tools"], "messages": [
            {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": CALL},
            {"role": "tool", "name": "open_box", "content": r["answer"]}, {"role": "assistant", "content": r["answer"]}]}

    folder = Path(folder)
    return {
        "train": write_jsonl([row() for _ in range(n_train)], folder / "box_train.jsonl"),
        "eval": write_jsonl([row() for _ in range(n_eval)], folder / "box_eval.jsonl"),
        "sft": write_jsonl([demo() for _ in range(n_demos)], folder / "box_sft.jsonl"),
    }


if __name__ == "__main__":
    for name, path in write_tool_task(sys.argv[1] if len(sys.argv) > 1 else "cluster_configs/local-cpu/data").items():
        print(name, path)
