"""Environments: config, loading and validation, and isolation in real host processes (no Ray, no models)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import wait
from pathlib import Path

import pytest
import yaml

from rayrlhf.config import EnvConfig, load_config, to_yaml
from rayrlhf.config.loading import ConfigError
from rayrlhf.envs import EnvFailure, EnvHost, EnvPool, HostSpec, StepResult, check_env, make_env_client
from rayrlhf.envs.protocol import normalize_reset, normalize_step
from rayrlhf.errors import InvalidInput

ENVS = '''
import asyncio, os, time
from pathlib import Path


class Counter:
    """Says how many turns it has seen; done after `turns`. Records close() in `log_dir`."""

    def __init__(self, turns=2, log_dir=None):
        self.turns, self.log_dir, self.t, self.name = turns, log_dir, 0, None

    def reset(self, row):
        self.name = row["id"]
        return row["prompt"]

    def step(self, action):
        self.t += 1
        if action == "raise":
            raise ValueError("user bug " + self.name)
        if action == "sleep":
            time.sleep(2.5)
        if action == "exit":
            os._exit(3)
        if action == "bad":
            return "not a tuple"
        if action == "alloc":
            blob = bytearray(1 << 30)
            return str(len(blob)), 0.0, True
        if action == "pid":
            return str(os.getpid()), 0.0, False
        if action == "nap":
            time.sleep(0.1)
        return [{"role": "user", "content": f"turn {self.t}"}], 0.5, self.t >= self.turns, {"custom": 2}

    def close(self):
        if self.log_dir:
            Path(self.log_dir, self.name).write_text(str(self.t))


class AsyncCounter(Counter):
    async def reset(self, row):
        await asyncio.sleep(0.01)
        return super().reset(row)

    async def step(self, action):
        if action == "sleep":
            await asyncio.sleep(10)
        await asyncio.sleep(0.1)
        return super().step(action)

    async def close(self):
        await asyncio.sleep(0.01)
        super().close()


class RaisesInInit:
    def __init__(self, level):
        raise RuntimeError(f"level {level} is not available")

    def reset(self, row):
        return None

    def step(self, action):
        return None, 0.0, True


class NoStep:
    def reset(self, row):
        return None


class NeedsColumn(Counter):
    def reset(self, row):
        return row["question"]


NOT_A_CLASS = 3
'''


@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("envs") / "my_envs.py"
    path.write_text(ENVS)
    return path


def spec(env_file: Path, name: str = "Counter", timeout: float = 5.0, memory: int | None = 1024, **kwargs) -> HostSpec:
    return HostSpec(f"{env_file}:{name}", kwargs, step_timeout_s=timeout, memory_limit_mb=memory, threads=32)


def row(i: object = 0) -> dict:
    return {"id": str(i), "prompt": f"hello {i}", "answer": 1}


@pytest.fixture
def host(env_file: Path, tmp_path: Path) -> Iterator[EnvHost]:
    h = EnvHost(spec(env_file, timeout=1.0, log_dir=str(tmp_path)), "test-host")
    yield h
    h.shutdown()


def failure_of(future) -> EnvFailure:
    with pytest.raises(EnvFailure) as info:
        future.result(timeout=30)
    return info.value


# ----- config -------------------------------------------------------------------------------------

BASE = ["data.train=x.jsonl", "reward.function=rayrlhf.rewards.tasks:sort_reward"]


def test_env_class_key_round_trips_through_yaml_and_set(tmp_path: Path) -> None:
    cfg = load_config(None, [*BASE, "env.class=envs/my.py:Game", "env.kwargs={level: 3}", "env.num_workers=2"])
    assert cfg.env.class_ == "envs/my.py:Game" and cfg.env.kwargs == {"level": 3}
    written = yaml.safe_load(to_yaml(cfg))["env"]
    assert written["class"] == "envs/my.py:Game" and "class_" not in written
    path = tmp_path / "job.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path).env == cfg.env
    assert EnvConfig(class_="a.py:B").class_spec == "a.py:B"
    assert EnvConfig(tools="t.py:TOOLS").class_spec == "rayrlhf.envs.tools:ToolEnv"
    assert not EnvConfig().enabled


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["env.klass=a.py:B"], r"env.klass: unknown key \(did you mean 'class'\?\)"),
        (["env.class=no_colon"], r"env.class: 'no_colon': expected 'path/to/file.py:Name'"),
        (["env.resources={cpus: 1}"], r"env.resources: unknown key\(s\) \['cpus'\]"),
        (["env.tools=t.py:TOOLS", "env.tool_timeout_s=30"], r"env.tool_timeout_s \(30\) must be below env.step_timeout_s"),
        (["env.max_turns=0"], r"env.max_turns"),
    ],
)
def test_config_errors_name_the_key(overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [*BASE, *overrides])


# ----- return values ------------------------------------------------------------------------------

def test_return_values_are_normalised_or_refused() -> None:
    assert normalize_reset(None) == [] and normalize_reset("hi") == [{"role": "user", "content": "hi"}]
    assert normalize_reset([{"role": "system", "content": "s"}]) == [{"role": "system", "content": "s"}]
    result = normalize_step(([{"role": "tool", "name": "f", "content": "4"}], 1, False))
    assert result == StepResult([{"role": "tool", "name": "f", "content": "4"}], 1.0, False, {})
    assert normalize_step(("obs", 0.5, True, {"n": 2})).info == {"n": 2.0}
    for bad, pattern in [
        ("x", r"step\(\) must return \(observation, reward, done\).*got str"),
        (("x", 1.0), "got a tuple of 2"),
        (("x", "1", True), "reward must be a finite float"),
        (("x", float("nan"), True), "reward must be a finite float"),
        (("x", 1.0, "yes"), "done must be a bool"),
        ((3, 1.0, True), "observation must be None, a str or a list of messages"),
        (([{"content": "x"}], 1.0, True), "message 0 has no 'role'"),
    ]:
        with pytest.raises(TypeError, match=pattern):
            normalize_step(bad)
    with pytest.raises(TypeError, match=r"reset\(\) must return None, a str"):
        normalize_reset(5)


# ----- loading and validation ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("cls", "kwargs", "pattern"),
    [
        ("missing.py:Env", {}, r"^env.class 'missing.py:Env': file missing.py does not exist"),
        ("{file}:Nope", {}, r"^env.class .*has no class 'Nope'"),
        ("{file}:NOT_A_CLASS", {}, r"^env.class .*'NOT_A_CLASS' is not a class"),
        ("{file}:NoStep", {}, r"^env.class .*NoStep has no step\(\) method"),
        ("{file}:Counter", {"turnz": 2}, r"^env.kwargs \{'turnz': 2\}: Counter\(\*\*env.kwargs\) does not fit"),
        ("{file}:RaisesInInit", {"level": 9}, r"(?s)^env.kwargs: constructing RaisesInInit.*level 9 is not available"),
        ("{file}:NeedsColumn", {}, r"(?s)^env.class: NeedsColumn.reset\(row\) on the first row.*KeyError: 'question'"),
        ("no_such_module_xyz:Env", {}, r"^env.class .*cannot import module"),
    ],
)
def test_check_env_names_the_key(env_file: Path, cls: str, kwargs: dict, pattern: str) -> None:
    env = EnvConfig(class_=cls.format(file=env_file), kwargs=kwargs, step_timeout_s=5)
    with pytest.raises(InvalidInput, match=pattern):
        check_env(env, row())


def test_check_env_accepts_good_envs_and_single_turn(env_file: Path) -> None:
    check_env(EnvConfig(), row())  # no environment: nothing to check
    check_env(EnvConfig(class_=f"{env_file}:Counter", kwargs={"turns": 3}), row())
    check_env(EnvConfig(class_=f"{env_file}:AsyncCounter"), row())


# ----- running episodes ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Counter", "AsyncCounter"])
def test_sync_and_async_episodes_run_and_close(env_file: Path, tmp_path: Path, name: str) -> None:
    host = EnvHost(spec(env_file, name, log_dir=str(tmp_path)), "h")
    try:
        assert host.reset("a", row("a")).result(timeout=30) == [{"role": "user", "content": "hello a"}]
        first = host.step("a", "x").result(timeout=10)
        assert (first.messages, first.reward, first.done) == ([{"role": "user", "content": "turn 1"}], 0.5, False)
        assert first.info["custom"] == 2 and 0 <= first.info["step_s"] < 5
        assert host.step("a", "y").result(timeout=10).done
        host.close("a")
        deadline = time.monotonic() + 10
        while not (tmp_path / "a").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (tmp_path / "a").read_text() == "2"
    finally:
        host.shutdown()


def test_close_runs_on_every_end_reason(host: EnvHost, tmp_path: Path) -> None:
    """done, stopped early (max turns / token budget: the caller just closes), raised, bad return, timed out."""
    for episode, action in [("done", "x"), ("early", None), ("raised", "raise"), ("bad", "bad"), ("slow", "sleep")]:
        host.reset(episode, row(episode)).result(timeout=30)
        if action == "x":
            host.step(episode, "x").result(timeout=10)
            assert host.step(episode, "x").result(timeout=10).done
        elif action is not None:
            failure_of(host.step(episode, action))
        host.close(episode)
    deadline = time.monotonic() + 15  # the timed-out step ends after 2.5 s, then its close() runs
    expected = {"done": "2", "early": "0", "raised": "1", "bad": "1", "slow": "1"}
    while time.monotonic() < deadline and not all((tmp_path / e).exists() for e in expected):
        time.sleep(0.05)
    assert {e: (tmp_path / e).read_text() for e in expected} == expected


def test_raised_fails_that_episode_only(host: EnvHost) -> None:
    for e in ("bad", "good"):
        host.reset(e, row(e)).result(timeout=30)
    failure = failure_of(host.step("bad", "raise"))
    assert failure.kind == "raised" and failure.where == "step"
    assert "ValueError: user bug bad" in failure.message and "my_envs.py" in failure.message
    assert "server.py" not in failure.message  # the traceback starts at the user's code
    assert host.step("good", "x").result(timeout=10).reward == 0.5
    again = failure_of(host.step("bad", "x"))  # a failed episode stays failed
    assert again.kind == "raised" and "already failed" in again.message


def test_bad_return_says_what_was_expected(host: EnvHost) -> None:
    host.reset("e", row()).result(timeout=30)
    failure = failure_of(host.step("e", "bad"))
    assert failure.kind == "bad_return"
    assert "step() must return (observation, reward, done)" in failure.message


def test_timeout_fails_in_time_and_the_host_is_recycled(host: EnvHost) -> None:
    host.reset("slow", row("slow")).result(timeout=30)
    host.reset("other", row("other")).result(timeout=30)
    old_pid = int(host.step("other", "pid").result(timeout=10).messages[0]["content"])
    started = time.monotonic()
    failure = failure_of(host.step("slow", "sleep"))
    elapsed = time.monotonic() - started
    assert failure.kind == "timeout" and "env.step_timeout_s" in failure.message
    assert 1.0 <= elapsed < 2.0, elapsed  # the timeout plus a little slack
    assert host.stats()["leaked"] == 1 and host.stats()["timeouts"] == 1
    # the old process keeps serving its episodes; new episodes go to a fresh one
    assert host.step("other", "x").result(timeout=10).reward == 0.5
    host.reset("new", row("new")).result(timeout=30)
    new_pid = int(host.step("new", "pid").result(timeout=10).messages[0]["content"])
    assert new_pid != old_pid
    host.close("slow")
    host.close("other")  # the old process has no episode left: it is ended
    deadline = time.monotonic() + 10
    while host.stats()["recycles"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.stats()["recycles"] == 1
    assert host.step("new", "x").result(timeout=10).reward == 0.5


def test_too_many_leaked_threads_recycle_the_host_at_once(env_file: Path) -> None:
    host = EnvHost(spec(env_file, timeout=0.5), "h", max_leaked=2)
    try:
        for e in ("slow1", "slow2", "bystander"):
            host.reset(e, row(e)).result(timeout=30)
        assert failure_of(host.step("slow1", "sleep")).kind == "timeout"
        assert failure_of(host.step("slow2", "sleep")).kind == "timeout"  # second leak: recycled now
        lost = failure_of(host.step("bystander", "x"))
        assert lost.kind == "crashed"
        assert host.stats()["recycles"] == 1 and host.stats()["leaked"] == 0
        host.reset("fresh", row("fresh")).result(timeout=30)
        assert host.step("fresh", "x").result(timeout=10).reward == 0.5
    finally:
        host.shutdown()


def test_async_timeout_is_cancelled_without_leaking(env_file: Path) -> None:
    host = EnvHost(spec(env_file, "AsyncCounter", timeout=0.5), "h")
    try:
        host.reset("e", row()).result(timeout=30)
        started = time.monotonic()
        assert failure_of(host.step("e", "sleep")).kind == "timeout"
        assert time.monotonic() - started < 1.2
        time.sleep(0.3)
        assert host.stats()["leaked"] == 0
    finally:
        host.shutdown()


def test_crash_fails_calls_in_flight_and_lost_instances_then_restarts(host: EnvHost) -> None:
    for e in ("crasher", "in_flight", "idle"):
        host.reset(e, row(e)).result(timeout=30)
    host.spec.step_timeout_s = 10.0  # the in-flight step must not time out first
    in_flight = host.step("in_flight", "sleep")
    time.sleep(0.2)
    crash = failure_of(host.step("crasher", "exit"))
    assert crash.kind == "crashed" and "exited with code 3" in crash.message
    assert failure_of(in_flight).kind == "crashed"
    lost = failure_of(host.step("idle", "x"))  # no call in flight, but its instance died with the process
    assert lost.kind == "crashed" and "lost" in lost.message
    host.reset("after", row("after")).result(timeout=30)  # a fresh process serves new episodes
    assert host.step("after", "x").result(timeout=10).reward == 0.5
    assert host.stats()["crashes"] == 1


def test_memory_limit_fails_the_episode_not_the_host(env_file: Path) -> None:
    host = EnvHost(spec(env_file, memory=512), "h")
    try:
        host.reset("hog", row("hog")).result(timeout=30)
        failure = failure_of(host.step("hog", "alloc"))  # 1 GiB under a 512 MiB limit
        assert failure.kind in ("raised", "crashed")
        assert "MemoryError" in failure.message or "died" in failure.message
        host.close("hog")
        host.reset("next", row("next")).result(timeout=30)
        assert host.step("next", "x").result(timeout=10).reward == 0.5
    finally:
        host.shutdown()


@pytest.mark.parametrize("name", ["AsyncCounter", "Counter"])
def test_concurrent_episodes_overlap(env_file: Path, name: str) -> None:
    """16 episodes whose steps each wait 100 ms: on the event loop (async) or on the host's threads (sync)."""
    host = EnvHost(spec(env_file, name), "h")
    try:
        wait([host.reset(str(i), row(i)) for i in range(16)], timeout=30)
        action = "x" if name == "AsyncCounter" else "nap"
        started = time.monotonic()
        results = [f.result(timeout=30) for f in [host.step(str(i), action) for i in range(16)]]
        elapsed = time.monotonic() - started
        assert [r.reward for r in results] == [0.5] * 16
        assert elapsed < 0.8, f"16 steps of 100 ms took {elapsed:.2f}s: they did not overlap"
    finally:
        host.shutdown()


def test_pool_spreads_episodes_over_processes(env_file: Path) -> None:
    pool = EnvPool(spec(env_file), "w0", processes=2)
    try:
        wait([pool.reset(str(i), row(i)) for i in range(4)], timeout=30)
        pids = [pool.step(str(i), "pid").result(timeout=10).messages[0]["content"] for i in range(4)]
        assert pids[0] == pids[2] != pids[1] == pids[3]
        assert os.getpid() not in {int(p) for p in pids}
        assert pool.stats()["episodes"] == 4
        with pytest.raises(ValueError, match="already running"):
            pool.reset("0", row())
    finally:
        pool.shutdown()


def test_make_env_client_local(env_file: Path) -> None:
    cfg = EnvConfig(class_=f"{env_file}:Counter", kwargs={"turns": 1}, processes_per_worker=1)
    client = make_env_client(cfg, "rollout-0")
    try:
        assert isinstance(client, EnvPool) and len(client.hosts) == 1
        client.reset("e", row()).result(timeout=30)
        assert client.step("e", "x").result(timeout=10).done
    finally:
        client.shutdown()
