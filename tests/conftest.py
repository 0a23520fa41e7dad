"""Shared fixtures: a tiny local model and one real local Ray instance for the whole session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# vLLM on CPU: run the engine core in the worker's own process (tensors pass by reference)
# and do not pin OpenMP threads to cores (pinning made decoding 6x slower on 2 cores).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rayrlhf.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A real local Ray; logical CPUs exceed the 2 physical cores so small actors can share them."""
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()
