"""env.num_workers > 0: environments in Ray actors env-0..env-N-1, behind the same Future API as the local pool.
This module starts its own small local Ray (or reuses the session's)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
import ray

from rayrlhf.config import EnvConfig
from rayrlhf.envs import EnvFailure, make_env_client
from rayrlhf.envs.actors import EnvActorPool, start_env_actors

ENV = '''
import os, time


class Slow:
    def reset(self, row):
        return row["prompt"]

    def step(self, action):
        if action == "wait":
            time.sleep(3)
        return f"{os.getpid()}", 1.0, False
'''


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EnvConfig, list]]:
    path = tmp_path_factory.mktemp("env-actors") / "slow_env.py"
    path.write_text(ENV)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", num_cpus=4, include_dashboard=False)
    cfg = EnvConfig(class_=f"{path}:Slow", num_workers=2, resources={"num_cpus": 0.5}, processes_per_worker=1,
                    step_timeout_s=20)
    actors = start_env_actors(cfg, max_restarts=2)
    try:
        yield cfg, actors
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started_here:
            ray.shutdown()


def test_episodes_run_on_the_named_actors(ray_env) -> None:
    cfg, actors = ray_env
    client = make_env_client(cfg, "rollout-0")  # finds env-0 / env-1 by name
    assert isinstance(client, EnvActorPool)
    for i in range(4):
        assert client.reset(f"e{i}", {"prompt": f"p{i}"}).result(timeout=120) == [{"role": "user", "content": f"p{i}"}]
    assert {client.actor_of(f"e{i}") for i in range(4)} == {"env-0", "env-1"}
    pids = {client.actor_of(f"e{i}"): client.step(f"e{i}", "x").result(timeout=60).messages[0]["content"]
            for i in range(4)}
    actor_pids = {ray.get(a.pid.remote()) for a in actors}
    assert len(set(pids.values())) == 2 and not {int(p) for p in pids.values()} & actor_pids  # in child processes
    for i in range(4):
        client.close(f"e{i}")


def test_killing_an_env_actor_fails_only_its_episodes_in_flight(ray_env) -> None:
    cfg, actors = ray_env
    client = EnvActorPool(actors)
    for e in ("a0", "a1", "b0", "b1"):  # round-robin: a0, b0 on env-0; a1, b1 on env-1
        client.reset(e, {"prompt": e}).result(timeout=120)
    assert [client.actor_of(e) for e in ("a0", "a1", "b0", "b1")] == ["env-0", "env-1", "env-0", "env-1"]
    in_flight = {e: client.step(e, "wait") for e in ("a0", "a1")}
    time.sleep(1.0)
    os.kill(ray.get(actors[0].pid.remote()), signal.SIGKILL)
    with pytest.raises(EnvFailure) as info:
        in_flight["a0"].result(timeout=60)
    assert info.value.kind == "crashed" and "env-0" in info.value.message
    assert in_flight["a1"].result(timeout=60).reward == 1.0  # env-1 did not notice
    assert client.step("b1", "x").result(timeout=60).reward == 1.0
    with pytest.raises(EnvFailure) as lost:  # b0's instance died with env-0's process
        client.step("b0", "x").result(timeout=120)
    assert lost.value.kind == "crashed"
    client.reset("c0", {"prompt": "c"}).result(timeout=120)  # Ray restarted env-0; it serves new episodes
    assert client.step("c0", "x").result(timeout=60).reward == 1.0
