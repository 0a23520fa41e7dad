"""The `lookup` task: a multi-turn task a tiny model learns on CPU, and only with its tool.

Each prompt asks for the value stored under a key ("value of q7?"). The value is a fixed pseudo-random
function of the key (three hex digits of a hash) that no model can work out: the only way to score is to call
the `get` tool, read what it returns and answer with it. A turn is

    A: <tool_call>{"name": "get", "arguments": {"key": "q7"}}</tool_call>
    T: 3fa
    A: 3fa

SFT on a few demonstrations teaches the format; GRPO then raises the share of episodes that call the tool
correctly and answer with its result (`env/tool_calls_mean`, `env/tool_errors`, `reward/mean`). The reward
(`rayrlhf.rewards.tasks:tool_answer`) is 1 when the last assistant turn is the value, else 0.

`python -m rayrlhf.data.tool_task DIR` writes the data that cluster_configs/local-cpu/tool_*.yaml use.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
import sys
from pathlib import Path

from rayrlhf.data.tasks import write_jsonl

KEYS = [f"{letter}{digit}" for letter in string.ascii_lowercase for digit in string.digits]


def value_of(key: str) -> str:
    """The value stored under `key`: three hex digits no model can derive."""
    return hashlib.sha256(f"rayrlhf-lookup:{key}".encode()).hexdigest()[:3]


def get(key: str) -> str:
    """Look up the value stored under a key.

    Args:
        key: the key, a letter and a digit such as "q7".
    """
    if key not in KEYS:
        raise KeyError(f"no such key: {key!r}")
    return value_of(key)


TOOLS = [get]


def call_text(key: str) -> str:
    """The assistant turn that calls the tool for `key` (the Hermes/Qwen tool-call format)."""
    return "<tool_call>" + json.dumps({"name": "get", "arguments": {"key": key}}) + "</tool_call>"


def write_tool_task(folder: str | Path, n_eval: int = 40, n_demos: int = 64, seed: int = 0) -> dict[str, Path]:
    """Prompt rows (train: every key not held out; eval: `n_eval` held-out keys) and SFT demonstrations
    (`n_demos` conversations on training keys, loss on the assistant turns)."""
    rng = random.Random(seed)
    keys = list(KEYS)
    rng.shuffle(keys)
    held_out, train = keys[:n_eval], keys[n_eval:]

    def prompt(key: str) -> dict:
        return {"prompt": f"value of {key}?", "key": key, "answer": value_of(key)}

    def demo(key: str) -> dict:
        return {"messages": [{"role": "user", "content": f"value of {key}?"},
                             {"role": "assistant", "content": call_text(key)},
                             {"role": "tool", "name": "get", "content": value_of(key)},
                             {"role": "assistant", "content": value_of(key)}]}

    folder = Path(folder)
    return {
        "train": write_jsonl([prompt(k) for k in train], folder / "lookup_train.jsonl"),
        "eval": write_jsonl([prompt(k) for k in held_out], folder / "lookup_eval.jsonl"),
        "sft": write_jsonl([demo(k) for k in rng.sample(train, n_demos)], folder / "lookup_sft.jsonl"),
    }


if __name__ == "__main__":
    for name, path in write_tool_task(sys.argv[1] if len(sys.argv) > 1 else "cluster_configs/local-cpu/data").items():
        print(name, path)
