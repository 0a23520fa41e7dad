"""Chaos: real faults injected into running jobs (real Ray, vLLM and DeepSpeed), from a seeded schedule.

1. On-policy GRPO on 2 vLLM workers: a worker's process is killed by its PID in the middle of a
   rollout, the other worker's engine is made to hang (a test-only hook holds its engine lock), and
   the reward server's process is killed in the middle of a call. The job finishes every step with
   every sample (none lost, none twice), the workers come back with verified weights, the hang is
   dumped, and every event is counted in metrics.jsonl.
2. Asynchronous GRPO (max_staleness 1) on a 2-rank policy: a rank's process is killed after the
   step-2 checkpoint. The trainer groups are rebuilt from it and the run equals an uninterrupted one.
3. The only rollout worker, with no restarts allowed, is killed mid-rollout: the job checkpoints the
   last finished step and stops; resumed, it equals an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import ray
from jobs import train

from rayrlhf.errors import WorkersLost
from rayrlhf.orchestrator.metrics import read_metrics

T = TypeVar("T")

REWARD = '''
import time
from pathlib import Path

from rayrlhf.rewards.tasks import alphabet_reward

BUSY = Path(__file__).with_suffix(".busy")
PAUSE = Path(__file__).with_suffix(".pause")

def reward(prompts, responses, **columns):
    while PAUSE.exists():  # the chaos schedule holds the job here until a restarted worker is up
        time.sleep(0.05)
    BUSY.write_text("scoring")  # and kills the server while this file exists
    try:
        time.sleep(SECONDS)
        return alphabet_reward(prompts, responses, **columns)
    finally:
        BUSY.unlink(missing_ok=True)
'''


def _reward(tmp_path: Path, seconds: float) -> Path:
    path = tmp_path / "chaos_reward.py"
    path.write_text(REWARD.replace("SECONDS", str(seconds)))
    return path


def _pid(name: str) -> int:
    return int(ray.get(ray.get_actor(name).identity.remote(), timeout=120)[1])


def _hold_until_restarted(chaos: Chaos, name: str, old_pid: int) -> None:
    """Pause the job (its reward calls wait) until actor `name` answers from a new process."""
    pause = chaos.out.parent / "chaos_reward.pause"
    pause.write_text("hold")
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if _pid(name) != old_pid:
                    return
            except ray.exceptions.ActorUnavailableError:
                pass
            assert time.monotonic() < deadline, f"{name} did not restart within 300 s"
            time.sleep(0.2)
    finally:
        pause.unlink()


def _stall_engine(worker: object) -> None:
    """Runs inside a rollout worker: a thread takes the engine lock and never gives it back (a hung engine)."""
    def hold() -> None:
        with worker._engine_lock:  # type: ignore[attr-defined]
            time.sleep(3600)

    threading.Thread(target=hold, name="chaos-stall", daemon=True).start()


class Chaos(threading.Thread):
    """Runs the fault schedule beside the job; records what it injected, and the first error it met."""

    def __init__(self, out: Path, schedule: Callable[[Chaos], None]) -> None:
        super().__init__(daemon=True, name="chaos")
        self.out, self.schedule = out, schedule
        self.rng = random.Random(1234)
        self.injected: list[str] = []
        self.error: BaseException | None = None
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            self.schedule(self)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def rows(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        return read_metrics(path) if path.is_file() else []

    def wait(self, done: Callable[[], bool], what: str, timeout_s: float = 400) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if self.stopped.is_set():
                raise AssertionError(f"the job ended before {what}")
            assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
            time.sleep(0.01)

    def during(self, job: Callable[[], T]) -> T:
        """Run `job` with this schedule beside it (the test then checks `error` and `injected`)."""
        self.start()
        try:
            return job()
        finally:
            self.stopped.set()
            self.join(timeout=60)

    def kill_mid_rollout(self, name: str, after_steps: int, max_delay_s: float = 0.0) -> int:
        """SIGKILL rollout worker `name` once `after_steps` rows are written, at a seeded point while it owes
        samples (checked again right before the kill; missed points wait for its next rollout). Returns the pid."""
        self.wait(lambda: len(self.rows()) >= after_steps, f"{after_steps} step(s)")
        worker, pid = ray.get_actor(name), _pid(name)
        while True:
            self.wait(lambda: ray.get(worker.load.remote()) > 0, f"samples in flight on {name}")
            time.sleep(self.rng.uniform(0.0, max_delay_s))
            if ray.get(worker.load.remote()) > 0:  # still owing samples: this is the middle of a rollout
                os.kill(pid, signal.SIGKILL)
                self.injected.append(f"kill {name}")
                return pid


def _worker_faults(chaos: Chaos) -> None:
    # 1. rollout-0's process, killed mid-rollout: at a seeded point after it has samples in flight
    chaos.kill_mid_rollout("rollout-0", after_steps=1, max_delay_s=0.05)
    # 2. at the next step boundary, rollout-1's engine hangs: when that is found, rollout-0 may still be restarting,
    #    and the step waits for it (no worker is in service), brings it up to date and goes on
    steps = len(chaos.rows())
    chaos.wait(lambda: len(chaos.rows()) > steps, "the next step boundary")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hook travels by value, not by module name
    stalled = _pid("rollout-1")
    ray.get(ray.get_actor("rollout-1").__ray_call__.remote(_stall_engine))
    chaos.injected.append("hang rollout-1")
    # 3. once the hang was found: the reward server's process, killed while it scores
    chaos.wait(lambda: any(r.get("faults/hangs", 0) >= 1 for r in chaos.rows()), "the hang found")
    pid = _pid("reward-0")
    busy = chaos.out.parent / "chaos_reward.busy"
    chaos.wait(busy.exists, "a reward call in flight")
    os.kill(pid, signal.SIGKILL)
    chaos.injected.append("kill reward-0")
    _hold_until_restarted(chaos, "rollout-1", stalled)
    chaos.wait(lambda: any(r.get("faults/worker_restarts", 0) >= 2 for r in chaos.rows()), "both workers back in service")


def test_rollout_workers_and_reward_server_survive_kills_and_a_hang(ray_local: None, tmp_path: Path) -> None:
    reward = _reward(tmp_path, 0.3)
    chaos = Chaos(tmp_path / "chaos", _worker_faults)
    rows = chaos.during(lambda: train(
        "cluster_configs/local-cpu/grpo.yaml", tmp_path, "chaos", "model.policy=tiny:qwen2",
        f"reward.function={reward}:reward", "rollout.backend=vllm", "rollout.num_workers=2", "rollout.num_cpus=0.5",
        "rollout.max_new_tokens=24", "rollout.min_new_tokens=16", "schedule.steps=12", "schedule.prompts_per_step=8",
        "algorithm.group_size=4", "rollout.micro_batch_size=8", "data.eval=null", "checkpoint.every=0",
        "faults.generation_timeout_s=20", "faults.generation_timeout_per_token_s=0", "faults.heartbeat_s=3",
        "reward.timeout_s=400",
    ))
    assert chaos.error is None, repr(chaos.error)
    assert chaos.injected == ["kill rollout-0", "hang rollout-1", "kill reward-0"]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all(r["rollout/samples"] == 32 and r["reward/failed"] == 0 for r in rows)  # every sample, once
    last = rows[-1]
    assert last["faults/worker_failures"] == 2 and last["faults/worker_restarts"] == 2
    assert last["faults/redispatched_samples"] > 0  # the killed and the hung worker owed samples
    assert last["faults/hangs"] == 1 and last["faults/hang_dumps"] == 1 and last["faults/server_restarts"] >= 1
    assert last["weight_version"] == 12
    [dump] = (tmp_path / "chaos" / "faults").glob("hang-rollout-1-*.txt")
    assert "hold" in dump.read_text()  # the stuck thread's frame is in the dump
    assert sum(r["reward/mean"] for r in rows[-3:]) > sum(r["reward/mean"] for r in rows[:3])  # and it still learns


def _kill_policy_rank(chaos: Chaos) -> None:
    latest = chaos.out / "checkpoints" / "latest"
    chaos.wait(lambda: latest.is_file() and latest.read_text().strip() == "step_2", "the step-2 checkpoint")
    time.sleep(chaos.rng.uniform(0.0, 0.05))
    os.kill(_pid("policy-1"), signal.SIGKILL)
    chaos.injected.append("kill policy-1")


ASYNC = ("model.policy=tiny:qwen2", "reward.function=rayrlhf.rewards.tasks:alphabet_reward", "schedule.max_staleness=1",
         "schedule.steps=6", "checkpoint.every=2", "trainer.policy.num_ranks=2", "schedule.prompts_per_step=4",
         "algorithm.group_size=4", "rollout.micro_batch_size=8", "data.eval=null")
COMPARED = ("reward/mean", "kl/mean", "response/length_mean", "policy/loss", "policy/grad_norm", "policy/is_weight_mean",
            "rollout/staleness_mean", "data/epoch", "weight_version")


def test_a_killed_trainer_rank_is_rebuilt_from_the_checkpoint_and_the_run_is_unchanged(
    ray_local: None, tmp_path: Path
) -> None:
    straight = train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "straight", *ASYNC)
    chaos = Chaos(tmp_path / "chaos", _kill_policy_rank)
    rows = chaos.during(lambda: train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "chaos", *ASYNC))
    assert chaos.error is None, repr(chaos.error)
    assert chaos.injected == ["kill policy-1"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["faults/trainer_restarts"] == 1
    for a, b in zip(straight, rows, strict=True):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


def _kill_the_only_worker(chaos: Chaos) -> None:
    chaos.kill_mid_rollout("rollout-0", after_steps=2)


LOSE = ("rollout.max_new_tokens=24", "rollout.min_new_tokens=16", "schedule.steps=4", "checkpoint.every=0",
        "schedule.prompts_per_step=8", "data.eval=null", "faults.restart_timeout_s=30")


def test_with_every_worker_lost_the_job_checkpoints_the_last_step_and_resume_finishes_the_run(
    ray_local: None, tmp_path: Path
) -> None:
    """One worker, no restarts allowed: killed in step 3's rollout. The job writes the step-2 checkpoint (step 3's
    prompts given back to the data) and stops naming it; resumed, it equals a run that was never interrupted."""
    straight = train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "straight", *LOSE)
    chaos = Chaos(tmp_path / "lost", _kill_the_only_worker)
    with pytest.raises(WorkersLost, match=r"no rollout worker is left.*checkpoint .*step_2; continue with --resume"):
        chaos.during(lambda: train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "lost", *LOSE, "faults.max_restarts=0"))
    assert chaos.error is None and chaos.injected == ["kill rollout-0"], repr(chaos.error)
    assert (tmp_path / "lost/checkpoints/latest").read_text().strip() == "step_2"
    resumed = train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "lost", *LOSE, resume=True)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed[-1]["faults/worker_failures"] == 1  # the count survived the resume
    for a, b in zip(straight, resumed, strict=True):
        for key in ("reward/mean", "kl/mean", "response/length_mean", "policy/loss", "data/epoch"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


def _kill_a_worker_then_wait_for_it(chaos: Chaos) -> None:
    pid = chaos.kill_mid_rollout("rollout-1", after_steps=1)
    _hold_until_restarted(chaos, "rollout-1", pid)
    chaos.wait(lambda: any(r.get("faults/worker_restarts", 0) >= 1 for r in chaos.rows()), "rollout-1 back in service")


def test_asynchronous_mode_re_sends_a_dead_workers_samples_and_takes_it_back_at_a_sync(
    ray_local: None, tmp_path: Path
) -> None:
    """max_staleness 2, 2 workers: a worker killed mid-rollout; its samples go to the other one while batches are
    in flight, and the restarted worker serves again from a weight sync on (the trainers are ahead of the batch)."""
    chaos = Chaos(tmp_path / "async", _kill_a_worker_then_wait_for_it)
    rows = chaos.during(lambda: train(
        "cluster_configs/local-cpu/grpo.yaml", tmp_path, "async", "schedule.max_staleness=2",
        f"reward.function={_reward(tmp_path, 0.0)}:reward", "reward.timeout_s=400", "rollout.num_workers=2",
        "rollout.num_cpus=0.5", "rollout.max_new_tokens=24", "rollout.min_new_tokens=16", "schedule.steps=12",
        "schedule.prompts_per_step=8", "checkpoint.every=0", "data.eval=null",
    ))
    assert chaos.error is None and chaos.injected == ["kill rollout-1"], repr(chaos.error)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all(r["rollout/samples"] == 32 for r in rows)
    last = rows[-1]
    assert last["faults/worker_failures"] == 1 and last["faults/worker_restarts"] == 1
    assert last["faults/redispatched_samples"] > 0
