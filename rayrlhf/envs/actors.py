"""env.num_workers > 0: environments in a pool of Ray actors named env-0..env-N-1.

Each `EnvActor` holds an `EnvPool` (env.processes_per_worker host processes), so user code still runs
in child processes and a crash there costs the actor nothing. The actors scale apart from the
rollout workers, take env.resources, show in the dashboard, and are restarted by Ray when their own
process dies (`max_restarts`): the calls in flight then fail "crashed", and so do later calls on the
episodes whose instances died with it (the restarted actor does not know them).

`EnvActorPool` is the rollout worker's client: the same Future-returning API as `EnvPool`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from concurrent.futures import Future
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from rayrlhf.envs.pool import EnvPool
from rayrlhf.envs.protocol import EnvFailure, HostSpec, StepResult

log = logging.getLogger(__name__)

ACTOR_NAME = "env-{}"
STATS_TIMEOUT_S = 10.0


@ray.remote
class EnvActor:
    """An EnvPool inside a Ray actor (async: a call waits on the host's future without holding a thread)."""

    def __init__(self, spec: HostSpec, name: str, processes: int) -> None:
        logging.basicConfig(level=logging.INFO)
        self.name = name
        self.pool = EnvPool(spec, name, processes)

    async def reset(self, episode_id: str, row: dict) -> list[dict]:
        return await asyncio.wrap_future(self.pool.reset(episode_id, row))

    async def step(self, episode_id: str, action: str) -> StepResult:
        try:
            future = self.pool.step(episode_id, action)
        except ValueError:
            raise EnvFailure("crashed", f"{self.name} does not hold episode {episode_id!r}: its instance was lost "
                             "when the actor restarted", "step") from None
        return await asyncio.wrap_future(future)

    async def close(self, episode_id: str) -> None:
        self.pool.close(episode_id)

    async def stats(self) -> dict[str, int]:
        return self.pool.stats()

    async def pid(self) -> int:
        return os.getpid()

    async def shutdown(self) -> None:
        self.pool.shutdown()


def start_env_actors(env_cfg: Any, max_restarts: int = 3) -> list[ActorHandle]:
    """Start env-0..env-N-1 (driver side); rollout workers find them by name (`env_actor_handles`)."""
    spec = HostSpec.from_config(env_cfg)
    return [
        EnvActor.options(
            name=ACTOR_NAME.format(i), max_restarts=max_restarts, max_task_retries=0, **env_cfg.resources,
        ).remote(spec, ACTOR_NAME.format(i), env_cfg.processes_per_worker)
        for i in range(env_cfg.num_workers)
    ]


def env_actor_handles(num_workers: int) -> list[ActorHandle]:
    return [ray.get_actor(ACTOR_NAME.format(i)) for i in range(num_workers)]


def _as_env_failure(exc: BaseException, actor: str, op: str) -> BaseException:
    """What a Ray call raised, as the EnvFailure the local pool would raise."""
    if isinstance(exc, EnvFailure):  # a RayTaskError wrapping one is an instance of it too
        return EnvFailure(exc.kind, exc.message, exc.where)
    if isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError)):
        return EnvFailure("crashed", f"env actor {actor} died or is unreachable: {type(exc).__name__}", op)
    return exc


class EnvActorPool:
    """The rollout worker's client of the env actors: episodes are assigned round-robin (starting at
    `first`, so that workers spread), and every call returns a concurrent Future."""

    def __init__(self, actors: list[ActorHandle], first: int = 0) -> None:
        if not actors:
            raise ValueError("EnvActorPool needs at least one env actor")
        self.actors = list(actors)
        self.names = [ACTOR_NAME.format(i) for i in range(len(actors))]
        self._next = itertools.count(first)
        self._lock = threading.Lock()
        self._where: dict[str, int] = {}

    def reset(self, episode_id: str, row: dict) -> Future[list[dict]]:
        with self._lock:
            if episode_id in self._where:
                raise ValueError(f"episode {episode_id!r} is already running: ids must be unique")
            i = self._where[episode_id] = next(self._next) % len(self.actors)
        return self._call(i, "reset", episode_id, row)

    def step(self, episode_id: str, action: str) -> Future[StepResult]:
        with self._lock:
            i = self._where.get(episode_id)
        if i is None:
            raise ValueError(f"episode {episode_id!r} is not running (reset it first)")
        return self._call(i, "step", episode_id, action)

    def close(self, episode_id: str) -> None:
        with self._lock:
            i = self._where.pop(episode_id, None)
        if i is not None:
            self.actors[i].close.remote(episode_id)  # fire and forget: a dead actor has nothing to close

    def actor_of(self, episode_id: str) -> str | None:
        """The name of the env actor holding the episode (for logs and tests)."""
        with self._lock:
            i = self._where.get(episode_id)
        return None if i is None else self.names[i]

    def stats(self) -> dict[str, int]:
        """Counters summed over the actors that answer within a few seconds."""
        total: dict[str, int] = {}
        refs = [a.stats.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=STATS_TIMEOUT_S)
        for ref in ready:
            try:
                counts = ray.get(ref)
            except Exception:  # noqa: BLE001 - a dead actor has no counters to add
                continue
            for key, value in counts.items():
                total[key] = total.get(key, 0) + value
        return total

    def shutdown(self) -> None:
        """Nothing to stop here: the actors belong to the driver, which started them."""

    def _call(self, i: int, op: str, episode_id: str, arg: Any) -> Future:
        out: Future = Future()
        try:
            source = getattr(self.actors[i], op).remote(episode_id, arg).future()
        except Exception as exc:  # noqa: BLE001 - e.g. the actor is gone for good
            out.set_exception(_as_env_failure(exc, self.names[i], op))
            return out

        def done(src: Future) -> None:
            exc = src.exception()
            if exc is None:
                out.set_result(src.result())
            else:
                out.set_exception(_as_env_failure(exc, self.names[i], op))

        source.add_done_callback(done)
        return out
