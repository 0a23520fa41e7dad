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
class EpisodeSpec:
    """A multi-turn episode instead of one response: the data row it starts from (every column, for the
    environment's reset), the conversation before the first assistant turn, the tools shown to the model,
    and its limits. The rollout worker runs the turns (rayrlhf/actors/episodes.py)."""

    row: dict
    messages: list[dict]
    tools: list[dict] | None = None
    max_turns: int = 8
    max_total_tokens: int = 1024


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
    episode: EpisodeSpec | None = None  # a multi-turn episode per sample (prompt_ids: its first prompt, before reset)

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
    # Multi-turn episodes only: response_ids hold every turn after the first prompt, the policy's and the
    # environment's; loss_mask says which the policy sampled (1; `logprobs` are 0.0 elsewhere).
    loss_mask: list[int] | None = None
    turns: list[dict] | None = None  # [{role, text, tokens, trained, reward}] in order, the first prompt excluded
    turn_rewards: list[tuple[int, float]] | None = None  # (index in response_ids of the turn's last policy token, reward)
    end_reason: str = ""  # done | max_turns | max_tokens | failed
    env_error: str | None = None  # the environment failure that ended the episode (the sample is not trained)
    env_info: dict[str, float] | None = None  # summed per-turn numbers: turns, step_s, tool_calls, tool_errors, ...

    @property
    def env_reward(self) -> float:
        return sum(r for _, r in self.turn_rewards or ())

    @property
    def truncated(self) -> bool:
        """The response hit the length limit without an end-of-sequence token."""
        return self.finish_reason == "length"
