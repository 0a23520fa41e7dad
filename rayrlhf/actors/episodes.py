"""Multi-turn episodes inside a rollout worker: the engine samples a turn, the environment answers, the
next turn is sampled from the whole conversation so far, until the environment says done, the turns run
out (env.max_turns) or the conversation reaches its token budget (rollout.max_total_tokens).

Token-in, token-out (docs/design.md, "Episodes"): each episode keeps one list of token ids and a parallel
mask. The prompt is rendered once; each assistant turn appends exactly the ids the engine sampled (mask 1,
with their sampling log-probs); the environment's reply appends the ids the chat template adds for it
(mask 0), computed by `rayrlhf.data.chat` as the difference of two renders. Nothing the policy wrote is
ever decoded and tokenized again, so the trainer trains on the sampled tokens and never on the
environment's.

No lockstep: while an episode waits for its environment, the engine goes on generating for the others;
the environment's answer adds the next turn to the engine's queue from whichever thread it arrives on.
The environment runs isolated (rayrlhf/envs/): a failure there ends that episode only (`end_reason`
"failed", `env_error`), and the sample is left out of the update.

Turn t of sample i is seeded from the request's seed (turn 0 exactly as a single-turn request would be),
so an episode run again from its start (its worker died) samples the same tokens on the same weights.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from rayrlhf.actors.types import Completion, GenerationRequest

log = logging.getLogger(__name__)

TURN_SEP = "@"  # a turn's engine request id: <request id>#<sample index>@<turn>


def turn_seed(seed: int | None, index: int, turn: int) -> int | None:
    """The engine seed of turn `turn` of sample `index` (the engine adds the sample index to the request's seed,
    so turn 0 is seeded as a single-turn request's sample `index` is)."""
    if seed is None:
        return None
    return seed + index if turn == 0 else (seed * 1_000_003 + index * 7_919 + turn * 104_729) % (2**31 - 1)


@dataclass
class _Episode:
    request: GenerationRequest
    index: int
    eid: str
    tokens: Any = None  # rayrlhf.data.chat.EpisodeTokens, once reset answered
    prompt_len: int = 0
    logprobs: list[float] = field(default_factory=list)
    turns: list[dict] = field(default_factory=list)
    turn_rewards: list[tuple[int, float]] = field(default_factory=list)
    info: dict[str, float] = field(default_factory=dict)
    turn: int = 0
    version: int = 0
    cut: bool = False  # the last turn hit its token limit (the episode counts as truncated)
    ended: bool = False


class EpisodeRunner:
    """The episodes of one rollout worker. `submit(request)` queues an engine request (one turn) and
    `deliver(completion)` hands a finished episode to its caller; both are the worker's, thread-safe."""

    def __init__(self, envs: Any, fmt: Any, submit: Callable[[GenerationRequest], None],
                 deliver: Callable[[Completion], None]) -> None:
        self.envs, self.fmt, self._submit, self._deliver = envs, fmt, submit, deliver
        self._episodes: dict[str, _Episode] = {}  # eid -> episode
        self._turns: dict[str, _Episode] = {}  # engine request id of a turn in flight -> its episode
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------- engine side
    def start(self, request: GenerationRequest) -> None:
        """Start one episode per sample index of `request` (its environment's reset first)."""
        for index in request.sample_indices:
            ep = _Episode(request, index, f"{request.request_id}#{index}")
            with self._lock:
                self._episodes[ep.eid] = ep
            try:
                future = self.envs.reset(ep.eid, dict(request.episode.row))
            except Exception as exc:  # noqa: BLE001 - the environment client refused: this episode fails
                self._end(ep, "failed", f"reset: {exc!r}")
                continue
            future.add_done_callback(lambda f, ep=ep: self._guard(ep, self._on_reset, f))

    def owns(self, engine_request_id: str) -> bool:
        with self._lock:
            return engine_request_id in self._turns

    def on_turn(self, completion: Completion) -> None:
        """A turn finished in the engine: hand its text to the environment (or end the episode at its budget)."""
        with self._lock:
            ep = self._turns.pop(completion.request_id)
        self._guard(ep, self._after_turn, completion)

    def rejected(self, request: GenerationRequest, exc: Exception) -> None:
        """The engine refused a turn (e.g. longer than its context): that episode fails."""
        with self._lock:
            ep = self._turns.pop(request.request_id, None)
        if ep is not None:
            self._end(ep, "failed", f"the engine refused turn {ep.turn}: {exc!r}"[:2000])

    def abort(self, reason: str) -> None:
        """The engine failed: every running episode ends (its caller gets the engine's error separately)."""
        with self._lock:
            episodes, self._episodes, self._turns = list(self._episodes.values()), {}, {}
        for ep in episodes:
            ep.ended = True
            self._close(ep)
        log.warning("aborted %d episode(s): %s", len(episodes), reason)

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._episodes)

    # ------------------------------------------------------------------------------- the turns
    def _guard(self, ep: _Episode, step: Callable[..., None], arg: Any) -> None:
        """Run one transition of `ep`; anything unexpected ends the episode as failed instead of losing it."""
        try:
            step(ep, arg)
        except Exception as exc:  # noqa: BLE001 - an environment failure, or a bug: this episode only
            from rayrlhf.envs import EnvFailure

            why = f"{exc.where or 'env'} {exc.kind}: {exc.message}" if isinstance(exc, EnvFailure) else repr(exc)
            if not isinstance(exc, EnvFailure):
                log.exception("episode %s failed", ep.eid)
            self._end(ep, "failed", why[:2000])

    def _on_reset(self, ep: _Episode, future: Future) -> None:
        from rayrlhf.data.chat import EpisodeTokens

        spec = ep.request.episode
        ep.tokens = EpisodeTokens.start(self.fmt, [*spec.messages, *future.result()], spec.tools)
        ep.prompt_len = len(ep.tokens.ids)
        self._next_turn(ep)

    def _next_turn(self, ep: _Episode) -> None:
        spec, sampling = ep.request.episode, ep.request.sampling
        budget = min(sampling.max_new_tokens, spec.max_total_tokens - len(ep.tokens.ids))
        if budget < 1:
            self._end(ep, "max_tokens")
            return
        rid = f"{ep.eid}{TURN_SEP}{ep.turn}"
        turn = GenerationRequest(rid, list(ep.tokens.ids), replace(
            sampling, n=1, max_new_tokens=budget, min_new_tokens=min(sampling.min_new_tokens, budget),
            seed=turn_seed(sampling.seed, ep.index, ep.turn)))
        with self._lock:
            if ep.ended:
                return
            self._turns[rid] = ep
        self._submit(turn)

    def _after_turn(self, ep: _Episode, c: Completion) -> None:
        spec = ep.request.episode
        ep.version, ep.cut = c.weight_version, c.finish_reason == "length"
        sampled, text = list(c.response_ids), self._text(c.response_ids)
        ep.turn += 1
        if c.finish_reason == "length" and len(ep.tokens.ids) + len(sampled) >= spec.max_total_tokens:
            self._append_last(ep, sampled, c.logprobs, text, reward=None)
            self._end(ep, "max_tokens")
            return
        future = self.envs.step(ep.eid, text)
        future.add_done_callback(lambda f: self._guard(ep, self._on_step, (sampled, c.logprobs, text, f)))

    def _on_step(self, ep: _Episode, arg: tuple) -> None:
        sampled, logprobs, text, future = arg
        result = future.result()
        for key, value in result.info.items():
            ep.info[key] = ep.info.get(key, 0.0) + float(value)
        done = result.done or ep.turn >= ep.request.episode.max_turns
        if done:
            self._append_last(ep, sampled, logprobs, text, reward=float(result.reward))
            self._end(ep, "done" if result.done else "max_turns")
            return
        start = len(ep.tokens.ids) - ep.prompt_len
        suffix = ep.tokens.add_turn(sampled, list(result.messages), next_turn=True,
                                    message={"role": "assistant", "content": text})
        ep.logprobs += [*logprobs, *[0.0] * len(suffix)]
        ep.turn_rewards.append((start + len(sampled) - 1, float(result.reward)))
        # `env_tokens`: what the template and the environment's reply added after this turn (never trained)
        ep.turns.append({"role": "assistant", "text": text, "tokens": len(sampled), "trained": True,
                         "reward": float(result.reward), "env_tokens": len(suffix)})
        ep.turns += [{"role": m.get("role", "user"), "text": str(m.get("content", "")), "trained": False}
                     for m in result.messages]
        if len(ep.tokens.ids) >= ep.request.episode.max_total_tokens:
            self._end(ep, "max_tokens")
        else:
            self._next_turn(ep)

    def _append_last(self, ep: _Episode, sampled: list[int], logprobs: list[float], text: str,
                     reward: float | None) -> None:
        """The episode's last turn: exactly the sampled ids (nothing after them, as in a single-turn response)."""
        start = len(ep.tokens.ids) - ep.prompt_len
        ep.tokens.ids += sampled
        ep.tokens.mask += [1] * len(sampled)
        ep.tokens.messages.append({"role": "assistant", "content": text})
        ep.logprobs += list(logprobs)
        if reward is not None and sampled:
            ep.turn_rewards.append((start + len(sampled) - 1, reward))
        ep.turns.append({"role": "assistant", "text": text, "tokens": len(sampled), "trained": True,
                         **({"reward": reward} if reward is not None else {})})

    def _text(self, ids: list[int]) -> str:
        stop = {self.fmt.eot_id, getattr(self.fmt.tokenizer, "eos_token_id", None)}
        body = ids[:-1] if ids and ids[-1] in stop else ids
        return self.fmt.tokenizer.decode(body, skip_special_tokens=True)

    # ------------------------------------------------------------------------------- the end
    def _end(self, ep: _Episode, reason: str, error: str | None = None) -> None:
        with self._lock:
            if ep.ended:
                return
            ep.ended = True
            self._episodes.pop(ep.eid, None)
        self._close(ep)
        ids = ep.tokens.ids if ep.tokens is not None else list(ep.request.prompt_ids)
        mask = ep.tokens.mask if ep.tokens is not None else [0] * len(ids)
        prompt_len = ep.prompt_len if ep.tokens is not None else len(ids)
        info = {**ep.info, "turns": float(sum(1 for t in ep.turns if t["role"] == "assistant"))}
        self._deliver(Completion(
            request_id=ep.request.request_id, sample_index=ep.index, prompt_ids=ids[:prompt_len],
            response_ids=ids[prompt_len:], logprobs=ep.logprobs,
            finish_reason="length" if reason == "max_tokens" or (ep.cut and reason != "failed") else "stop",
            weight_version=ep.version, loss_mask=mask[prompt_len:], turns=ep.turns, turn_rewards=ep.turn_rewards,
            end_reason=reason, env_error=error, env_info=info,
        ))

    def _close(self, ep: _Episode) -> None:
        try:
            self.envs.close(ep.eid)
        except Exception as exc:  # noqa: BLE001 - closing is best effort; the episode is over either way
            log.debug("closing %s: %r", ep.eid, exc)
