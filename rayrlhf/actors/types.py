"""The small typed messages that cross actor boundaries.

Requests and completions are plain dataclasses (cheap to pickle through Ray); training
batches are dicts of tensors built by `rayrlhf.models.forward.pack_batch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample one response. `n` > 1 is expanded into n independent requests."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to sample `sampling.n` responses for. `request_id` must be unique per worker."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingSpec = field(default_factory=SamplingSpec)


@dataclass
class Completion:
    """One sampled response, with everything the trainer needs to score and train on it."""

    request_id: str
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    weight_version: int
    worker: str = ""

    @property
    def truncated(self) -> bool:
        """The response hit the length limit without an end-of-sequence token."""
        return self.finish_reason == "length"
