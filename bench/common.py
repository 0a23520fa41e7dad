"""Helpers shared by the benchmarks: a mid-sized local model and the one-line JSON result."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

# vLLM on CPU: engine core in-process, no OpenMP thread pinning (see ENVIRONMENT.md).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def build_model(path: Path, hidden: int, layers: int, intermediate: int, heads: int) -> Path:
    """A randomly initialised Llama of the given size with the char tokenizer (no hub needed)."""
    from rayrlhf.models.tiny import build_tiny_model

    if not (path / "config.json").is_file():
        build_tiny_model(path, hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=intermediate)
    return path


def num_params(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                   else _prod(f.get_slice(k).get_shape()) for k in f.keys())


def _prod(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def machine() -> str:
    return f"{os.cpu_count()} CPU cores, {platform.machine()}, {platform.python_implementation()} {platform.python_version()}"


def result(metric: str, value: float, baseline: float, **extra: object) -> None:
    """Print the benchmark's closing JSON line (ratio = value / baseline; higher is better)."""
    line = {"metric": metric, "value": round(value, 4), "baseline": round(baseline, 4), "ratio": round(value / baseline, 4)}
    line.update(extra)
    print(json.dumps(line), flush=True)
