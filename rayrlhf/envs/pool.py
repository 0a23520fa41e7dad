"""Where environments run, behind one API: `EnvPool` (host processes beside the caller) and the Ray actor
pool (rayrlhf/envs/actors.py, for env.num_workers > 0). `make_env_client` picks one from the config, so
the rollout worker does not care where its episodes' environments live."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import Future
from typing import Any, Protocol

from rayrlhf.envs.host import EnvHost
from rayrlhf.envs.protocol import HostSpec, StepResult


class EnvClient(Protocol):
    """What the rollout worker calls: non-blocking, thread-safe; failures arrive as EnvFailure in the future."""

    def reset(self, episode_id: str, row: dict) -> Future[list[dict]]: ...

    def step(self, episode_id: str, action: str) -> Future[StepResult]: ...

    def close(self, episode_id: str) -> None: ...

    def stats(self) -> dict[str, int]: ...

    def shutdown(self) -> None: ...


class EnvPool:
    """`processes` host processes; each episode lives on one, assigned round-robin at reset, so a crash
    fails only the episodes of that process."""

    def __init__(self, spec: HostSpec, name: str = "env", processes: int = 2) -> None:
        self.hosts = [EnvHost(spec, f"{name}-host{i}") for i in range(processes)]
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._where: dict[str, EnvHost] = {}

    def reset(self, episode_id: str, row: dict) -> Future[list[dict]]:
        with self._lock:
            if episode_id in self._where:
                raise ValueError(f"episode {episode_id!r} is already running: ids must be unique")
            host = self.hosts[next(self._next) % len(self.hosts)]
            self._where[episode_id] = host
        return host.reset(episode_id, row)

    def step(self, episode_id: str, action: str) -> Future[StepResult]:
        return self._host(episode_id).step(episode_id, action)

    def close(self, episode_id: str) -> None:
        with self._lock:
            host = self._where.pop(episode_id, None)
        if host is not None:
            host.close(episode_id)

    def stats(self) -> dict[str, int]:
        """Counters summed over the host processes (crashes, recycles, timeouts, leaked, episodes)."""
        total: dict[str, int] = {}
        for host in self.hosts:
            for key, value in host.stats().items():
                total[key] = total.get(key, 0) + value
        return total

    def shutdown(self) -> None:
        for host in self.hosts:
            host.shutdown()

    def _host(self, episode_id: str) -> EnvHost:
        with self._lock:
            host = self._where.get(episode_id)
        if host is None:
            raise ValueError(f"episode {episode_id!r} is not running (reset it first)")
        return host


def make_env_client(env_cfg: Any, name: str, actors: list | None = None) -> EnvClient:
    """The environments of one rollout worker: host processes beside it (env.num_workers = 0), or the env
    actors env-0..env-N-1 (`actors`, or looked up by name), started by `start_env_actors` on the driver."""
    spec = HostSpec.from_config(env_cfg)
    if env_cfg.num_workers == 0:
        return EnvPool(spec, name, env_cfg.processes_per_worker)
    from rayrlhf.envs.actors import EnvActorPool, env_actor_handles

    handles = actors if actors is not None else env_actor_handles(env_cfg.num_workers)
    return EnvActorPool(handles, first=sum(name.encode()) % len(handles))
