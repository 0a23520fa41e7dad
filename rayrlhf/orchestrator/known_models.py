"""Shapes of a few hub models the planner knows without their config.json (planning before any download).

Dimensions from the models' published configurations; only the keys memory depends on. A hub id in
the local Hugging Face cache, or a directory, is always read from its own config.json instead.
"""

from __future__ import annotations

from typing import Any


def _qwen25(hidden: int, intermediate: int, heads: int, layers: int, kv_heads: int) -> dict[str, Any]:
    return {"model_type": "qwen2", "hidden_size": hidden, "intermediate_size": intermediate,
            "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv_heads,
            "vocab_size": 152064, "tie_word_embeddings": False, "max_position_embeddings": 32768}


# "-Instruct" variants share their base model's shape (capacity.model_config drops the suffix).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-7B": _qwen25(3584, 18944, 28, 28, 4),
    "Qwen/Qwen2.5-32B": _qwen25(5120, 27648, 40, 64, 8),
    "Qwen/Qwen2.5-72B": _qwen25(8192, 29568, 64, 80, 8),
}
