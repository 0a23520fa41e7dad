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
    prompt_logprobs: bool = False  # also return log p(token t | tokens < t) of every prompt token (a probe)


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to sample `sampling.n` responses for. `request_id` must be unique per worker.

    `indices` narrows it to some of the n samples (sample i is seeded `sampling.seed + i` wherever it
    runs): a request sent again after its worker failed asks only for the samples that did not come back.
    """

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    indices: tuple[int, ...] | None = None

    @property
    def sample_indices(self) -> tuple[int, ...]:
        return tuple(range(self.sampling.n)) if self.indices is None else self.indices


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
    prompt_logprobs: list[float] | None = None  # for tokens 1.. of the prompt, when the request asked (temperature 1)

    @property
    def truncated(self) -> bool:
        """The response hit the length limit without an end-of-sequence token."""
        return self.finish_reason == "length"
