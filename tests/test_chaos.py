"""Chaos: real faults injected into running jobs (real Ray, vLLM and DeepSpeed), each run compared with an
uninterrupted run of the same seeds.

1. Rollout workers (on-policy GRPO, 2 vLLM workers): a worker SIGKILLed mid-rollout, a worker SIGKILLed
   inside its weight sync, a worker killed during an evaluation, an engine that hangs. Every step trains on
   the same multiset of (data row, sample index) as the uninterrupted run (computed from the seeded data
   order), none twice, none missing; the workers come back and serve again.
2. Faults the design promises to survive exactly (ZeRO-3 policy of 2 ranks, collective weight sync over
   gloo): the reward function's child process SIGKILLed mid-call, the reference server SIGKILLed, a trainer
   rank SIGKILLed inside a train step's collective and inside the collective weight sync. Every figure of
   every step equals the uninterrupted run's.
3. The only rollout worker, with no restarts allowed, is killed mid-rollout: the job checkpoints the last
   finished step and stops; resumed, it equals an uninterrupted run.
4. Asynchronous mode with its default single worker: the worker is SIGKILLed mid-rollout and rejoins in the
   middle of that rollout with the weights the batch samples with (kept from the last sync); then, with no
   restarts left, a loss after a step's update checkpoints that step (not an older one) and resume finishes.
5. A reward function that stops scoring: past faults.max_failed_frac the job checkpoints and stops.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import ray
from jobs import ROOT, train

from rayrlhf.errors import FailureBudgetExceeded, WorkersLost
from rayrlhf.orchestrator.metrics import read_metrics
from rayrlhf.orchestrator.samples import read_samples

T = TypeVar("T")

REWARD = '''
import time
from pathlib import Path

from rayrlhf.rewards.tasks import sort_reward

HERE = Path(__file__)
BUSY, PAUSE, EVAL = (HERE.with_suffix(s) for s in (".busy", ".pause", ".eval"))

def reward(prompts, responses, answer, split=None, **columns):
    while PAUSE.exists():  # the chaos schedule holds the job here until a restarted worker is up
        time.sleep(0.05)
    if any(s == "eval" for s in split or []):
        EVAL.write_text("an evaluation is scoring")
    BUSY.write_text("scoring")  # the schedule kills this process while the file exists
    try:
        time.sleep(SECONDS)
        return sort_reward(prompts, responses, answer)
    finally:
        BUSY.unlink(missing_ok=True)
'''


def _task(tmp_path: Path, seconds: float) -> tuple[Path, Path, Path]:
    """The chaos reward, and the sort task's train/eval data with a `split` column (the eval rows say "eval")."""
    reward = tmp_path / "chaos_reward.py"
    reward.write_text(REWARD.replace("SECONDS", str(seconds)))
    data = {}
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (ROOT / f"cluster_configs/local-cpu/data/sort_{split}.jsonl").read_text().splitlines()]
        data[split] = tmp_path / f"sort_{split}.jsonl"
        data[split].write_text("".join(json.dumps({**r, "split": split}) + "\n" for r in rows))
    return reward, data["train"], data["eval"]


def _pid(name: str) -> int:
    return int(ray.get(ray.get_actor(name).identity.remote(), timeout=120)[1])


def _mark_then_wait(obj: object, attribute: str, marker: str, seconds: float) -> None:
    """Runs inside an actor: `obj.attribute` (a method looked up on the instance) first writes `marker`, then
    waits `seconds`, then does its work, the first time it is called: the schedule kills the process meanwhile."""
    import time as _time
    from pathlib import Path as _Path

    original = getattr(obj, attribute)
    state = {"armed": True}

    def hooked(*args, **kwargs):  # noqa: ANN002, ANN003
        if state["armed"]:
            state["armed"] = False
            _Path(marker).write_text(attribute)
            _time.sleep(seconds)
        return original(*args, **kwargs)

    setattr(obj, attribute, hooked)


def _in_sync(worker: object, marker: str) -> None:
    _mark_then_wait(worker._engine, "begin_weight_update", marker, 5.0)  # type: ignore[attr-defined]


def _in_train_collective(rank: object, marker: str) -> None:
    _mark_then_wait(rank, "_all_reduce", marker, 5.0)


def _in_weight_broadcast(rank: object, marker: str) -> None:
    _mark_then_wait(rank, "_full_tensors", marker, 5.0)


def _stall_engine(worker: object) -> None:
    """Runs inside a rollout worker: its engine thread is handed work that never ends (a hung engine)."""
    from concurrent.futures import Future

    def hold() -> None:  # named, so that the hang's stack dump shows it
        time.sleep(3600)

    with worker._cond:  # type: ignore[attr-defined]
        worker._calls.append((hold, (), Future()))  # type: ignore[attr-defined]
        worker._cond.notify_all()  # type: ignore[attr-defined]


class Chaos(threading.Thread):
    """Runs the fault schedule beside the job; records what it injected, and the first error it met."""

    def __init__(self, out: Path, schedule: Callable[[Chaos], None]) -> None:
        super().__init__(daemon=True, name="chaos")
        self.out, self.schedule = out, schedule
        self.rng = random.Random(1234)
        self.injected: list[str] = []
        self.error: BaseException | None = None
        self.stopped = threading.Event()
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # hooks travel by value, not by module name

    def run(self) -> None:
        try:
            self.schedule(self)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def rows(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        return read_metrics(path) if path.is_file() else []

    def last(self, key: str) -> float:
        rows = [r for r in self.rows() if key in r]
        return rows[-1][key] if rows else 0

    def wait(self, done: Callable[[], bool], what: str, timeout_s: float = 400) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if self.stopped.is_set():
                raise AssertionError(f"the job ended before {what}")
            assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
            time.sleep(0.01)

    def steps_done(self, n: int) -> None:
        self.wait(lambda: sum(1 for r in self.rows() if r.get("step", 0) > 0) >= n, f"{n} step(s)")

    def during(self, job: Callable[[], T]) -> T:
        """Run `job` with this schedule beside it (the test then checks `error` and `injected`)."""
        self.start()
        try:
            return job()
        finally:
            self.stopped.set()
            self.join(timeout=60)

    def kill(self, pid: int, what: str) -> None:
        os.kill(pid, signal.SIGKILL)
        self.injected.append(what)

    def kill_inside(self, name: str, hook: Callable[..., None], what: str) -> None:
        """Arm `hook` in actor `name` and SIGKILL the actor once the hooked call has begun."""
        marker = self.out.parent / f"{name}-{hook.__name__}.marker"
        marker.unlink(missing_ok=True)
        pid = _pid(name)
        ray.get(ray.get_actor(name).__ray_call__.remote(hook, str(marker)))
        self.wait(marker.exists, f"{name} inside {hook.__name__}")
        time.sleep(self.rng.uniform(0.0, 0.5))
        self.kill(pid, what)

    def kill_mid_rollout(self, name: str, max_delay_s: float = 0.0) -> int:
        """SIGKILL rollout worker `name` at a seeded point while it owes samples (checked again right before the
        kill; missed points wait for its next rollout). Returns the pid."""
        worker, pid = ray.get_actor(name), _pid(name)
        while True:
            self.wait(lambda: ray.get(worker.load.remote()) > 0, f"samples in flight on {name}")
            time.sleep(self.rng.uniform(0.0, max_delay_s))
            if ray.get(worker.load.remote()) > 0:  # still owing samples: this is the middle of a rollout
                self.kill(pid, f"kill {name}")
                return pid

    def hold_until_restarted(self, name: str, old_pid: int) -> None:
        """Pause the job (its reward calls wait) until actor `name` answers from a new process."""
        pause = self.out.parent / "chaos_reward.pause"
        pause.write_text("hold")
        try:
            self.wait(lambda: _answers_from_new_process(name, old_pid), f"{name} restarted", timeout_s=300)
        finally:
            pause.unlink()


def _answers_from_new_process(name: str, old_pid: int) -> bool:
    try:
        return _pid(name) != old_pid
    except ray.exceptions.ActorUnavailableError:
        return False


def _trained(out: Path) -> dict[int, Counter]:
    """Per step, the multiset of (data row, sample index) the step trained on (samples/step_N.jsonl)."""
    return {int(p.stem.removeprefix("step_")): Counter((s["row"], s["sample_index"]) for s in read_samples(p))
            for p in sorted((out / "samples").glob("step_*.jsonl"))}


def _uninterrupted(train_file: Path, steps: int, prompts: int, group: int, seed: int = 0) -> dict[int, Counter]:
    """Per step, the multiset of (data row, sample index) an uninterrupted run of these seeds trains on: the data
    order is a function of the seed alone (every step takes the next `prompts` rows of its seeded shuffle), so it
    is computed here instead of running the job twice."""
    from rayrlhf.data.datasets import PromptDataset, load_rows

    rows = load_rows(str(train_file), "prompt")
    data = PromptDataset(rows, [[0]] * len(rows), seed=seed)
    return {step: Counter((row, i) for row in data.next_batch(prompts) for i in range(group)) for step in range(1, steps + 1)}


COMPARED = ("reward/mean", "kl/mean", "response/length_mean", "policy/loss", "policy/grad_norm", "data/epoch",
            "weight_version")


def _equal_figures(straight: list[dict], chaos: list[dict], keys: tuple[str, ...] = COMPARED) -> None:
    straight, chaos = [r for r in straight if r["step"] > 0], [r for r in chaos if r["step"] > 0]
    assert [r["step"] for r in chaos] == [r["step"] for r in straight]
    for a, b in zip(straight, chaos, strict=True):
        for key in keys:
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


# ------------------------------------------------------------------------------------- 1. workers

def _worker_faults(chaos: Chaos) -> None:
    """Each kill is followed by holding the job (its reward calls wait) until the worker's new process answers, so
    the short job does not end before the worker could come back."""
    chaos.steps_done(1)
    pid = chaos.kill_mid_rollout("rollout-0", max_delay_s=0.05)  # a. mid-rollout
    chaos.hold_until_restarted("rollout-0", pid)
    chaos.steps_done(3)
    pid = _pid("rollout-1")
    chaos.kill_inside("rollout-1", _in_sync, "kill rollout-1 in its weight sync")  # b. inside the sync
    chaos.hold_until_restarted("rollout-1", pid)
    chaos.wait(lambda: chaos.last("faults/worker_restarts") >= 2, "both workers back", timeout_s=300)
    evaluating = chaos.out.parent / "chaos_reward.eval"
    evaluating.unlink(missing_ok=True)
    chaos.wait(evaluating.exists, "an evaluation scoring (step 8 or 12)")  # c. during an evaluation
    pid = _pid("rollout-0")
    chaos.kill(pid, "kill rollout-0 during the evaluation")
    chaos.hold_until_restarted("rollout-0", pid)
    chaos.wait(lambda: chaos.last("faults/worker_restarts") >= 3, "rollout-0 back")
    stalled = _pid("rollout-1")
    ray.get(ray.get_actor("rollout-1").__ray_call__.remote(_stall_engine))  # d. a hung engine
    chaos.injected.append("hang rollout-1")
    chaos.wait(lambda: chaos.last("faults/hangs") >= 1, "the hang found")
    chaos.hold_until_restarted("rollout-1", stalled)
    chaos.wait(lambda: chaos.last("faults/worker_restarts") >= 4, "rollout-1 back")


def test_worker_faults_train_every_sample_of_every_step_exactly_once(ray_local: None, tmp_path: Path) -> None:
    reward, train_file, eval_file = _task(tmp_path, 0.3)
    job = ("model.policy=tiny:qwen2", f"reward.function={reward}:reward", f"data.train={train_file}",
           f"data.eval={eval_file}", "schedule.eval_every=4", "schedule.eval_max_prompts=8", "rollout.backend=vllm",
           "rollout.num_workers=2", "rollout.num_cpus=0.5", "rollout.max_new_tokens=24", "rollout.min_new_tokens=16",
           "schedule.steps=16", "schedule.prompts_per_step=8", "algorithm.group_size=4", "rollout.micro_batch_size=4",
           "checkpoint.every=0", "rollout.dump_every=1", "faults.generation_timeout_s=20",
           "faults.generation_timeout_per_token_s=0", "faults.sync_timeout_s=20", "faults.heartbeat_s=3", "reward.timeout_s=400")
    chaos = Chaos(tmp_path / "chaos", _worker_faults)
    rows = chaos.during(lambda: train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "chaos", *job))
    assert chaos.error is None, repr(chaos.error)
    assert chaos.injected == ["kill rollout-0", "kill rollout-1 in its weight sync", "kill rollout-0 during the evaluation",
                              "hang rollout-1"]
    trained, expected = _trained(tmp_path / "chaos"), _uninterrupted(train_file, 16, 8, 4)
    assert sorted(trained) == list(range(1, 17))
    for step, samples in trained.items():  # the same (row, sample index) pairs, each once
        assert samples == expected[step] and set(samples.values()) == {1}, step
    train_rows = [r for r in rows if r["step"] > 0]
    assert all(r["rollout/samples"] == 32 and r["reward/failed"] == 0 for r in train_rows)
    assert {r["step"]: r["eval/samples"] for r in rows if "eval/samples" in r} == {s: 8 for s in (0, 4, 8, 12, 16)}
    last = train_rows[-1]
    assert last["faults/worker_failures"] == 4 and last["faults/worker_restarts"] == 4
    assert last["faults/redispatched_samples"] > 0 and last["faults/hangs"] == 1 and last["faults/hang_dumps"] == 1
    assert last["weight_version"] == 16
    [dump] = (tmp_path / "chaos" / "faults").glob("hang-rollout-1-*.txt")
    assert "hold" in dump.read_text()  # the stuck thread's frame is in the dump
    served = Counter(s["worker"] for s in read_samples(tmp_path / "chaos" / "samples" / "step_16.jsonl"))
    assert set(served) == {"rollout-0", "rollout-1"}  # both back in service


# --------------------------------------------------------------------------------- 2. exact faults

def _exact_faults(chaos: Chaos) -> None:
    import psutil

    busy = chaos.out.parent / "chaos_reward.busy"
    chaos.steps_done(1)
    chaos.wait(busy.exists, "a reward call in flight")
    [child] = [p for p in psutil.Process(_pid("reward-0")).children()  # a. the reward function's process, mid-call
               if "spawn_main" in " ".join(p.cmdline())]  # (not multiprocessing's resource tracker)
    chaos.kill(child.pid, "kill the reward function's process")
    chaos.steps_done(2)
    chaos.kill(_pid("reference"), "kill reference")  # b. the reference server
    chaos.steps_done(4)  # the step-4 checkpoint is written: the next rebuild goes back to it
    chaos.kill_inside("policy-1", _in_train_collective, "kill policy-1 in a train step's collective")  # c.
    chaos.wait(lambda: chaos.last("faults/trainer_restarts") >= 1 and chaos.last("step") >= 6, "the rebuild and step 6")
    chaos.kill_inside("policy-1", _in_weight_broadcast, "kill policy-1 in the collective weight sync")  # d.


def test_faults_that_are_survived_exactly_leave_every_figure_equal(ray_local: None, tmp_path: Path) -> None:
    reward, train_file, _ = _task(tmp_path, 0.3)
    job = ("model.policy=tiny:qwen2", f"reward.function={reward}:reward", f"data.train={train_file}", "data.eval=null",
           "trainer.policy.num_ranks=2", "trainer.zero_stage=3", "servers.weight_sync_backend=collective",
           "schedule.steps=8", "checkpoint.every=2", "schedule.prompts_per_step=4", "algorithm.group_size=4",
           "rollout.micro_batch_size=8", "algorithm.kl_coef=0.05", "reward.timeout_s=400", "faults.heartbeat_s=5")
    straight = train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "straight", *job)
    chaos = Chaos(tmp_path / "chaos", _exact_faults)
    rows = chaos.during(lambda: train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "chaos", *job))
    assert chaos.error is None, repr(chaos.error)
    assert chaos.injected == ["kill the reward function's process", "kill reference",
                              "kill policy-1 in a train step's collective", "kill policy-1 in the collective weight sync"]
    _equal_figures(straight, rows)
    last = rows[-1]
    assert last["faults/trainer_restarts"] == 2 and last["faults/reward_restarts"] == 1
    assert last["faults/server_restarts"] == 1 and last["reward/failed"] == 0


# ------------------------------------------------------------------------------ 3. every worker lost

LOSE = ("rollout.max_new_tokens=24", "rollout.min_new_tokens=16", "schedule.steps=4", "checkpoint.every=0",
        "schedule.prompts_per_step=8", "data.eval=null", "faults.restart_timeout_s=30")


def test_with_every_worker_lost_the_job_checkpoints_the_last_step_and_resume_finishes_the_run(
    ray_local: None, tmp_path: Path
) -> None:
    """One worker, no restarts allowed: killed in step 3's rollout. The job writes the step-2 checkpoint (step 3's
    prompts given back to the data) and stops naming it; resumed, it equals a run that was never interrupted."""
    def kill_in_step_3(chaos: Chaos) -> None:
        chaos.steps_done(2)
        chaos.kill_mid_rollout("rollout-0")

    straight = train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "straight", *LOSE)
    chaos = Chaos(tmp_path / "lost", kill_in_step_3)
    with pytest.raises(WorkersLost, match=r"no rollout worker is left.*checkpoint .*step_2; continue with --resume"):
        chaos.during(lambda: train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "lost", *LOSE, "faults.max_restarts=0"))
    assert chaos.error is None and chaos.injected == ["kill rollout-0"], repr(chaos.error)
    assert (tmp_path / "lost/checkpoints/latest").read_text().strip() == "step_2"
    resumed = train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "lost", *LOSE, resume=True)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed[-1]["faults/worker_failures"] == 1  # the count survived the resume
    _equal_figures(straight, resumed, ("reward/mean", "kl/mean", "response/length_mean", "policy/loss", "data/epoch"))


# ------------------------------------------------------------------------------ 4. asynchronous mode

ASYNC = ("schedule.max_staleness=1", "schedule.steps=8", "schedule.prompts_per_step=8", "data.eval=null",
         "checkpoint.every=0", "rollout.dump_every=1", "rollout.max_new_tokens=24", "rollout.min_new_tokens=16")


def test_asynchronous_mode_with_one_worker_survives_its_crash_mid_rollout(ray_local: None, tmp_path: Path) -> None:
    """Before: with one worker (the default) any crash stopped an asynchronous job, since a restarted worker
    rejoined only at a weight sync. Now it rejoins mid-rollout with the weights the batch samples with."""
    reward, train_file, _ = _task(tmp_path, 0.1)
    job = (*ASYNC, f"reward.function={reward}:reward", f"data.train={train_file}", "reward.timeout_s=400")

    def kill_the_worker(chaos: Chaos) -> None:
        chaos.steps_done(2)
        chaos.kill_mid_rollout("rollout-0")

    chaos = Chaos(tmp_path / "async", kill_the_worker)
    rows = chaos.during(lambda: train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "async", *job))
    assert chaos.error is None and chaos.injected == ["kill rollout-0"], repr(chaos.error)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["faults/worker_failures"] == 1 and rows[-1]["faults/worker_restarts"] == 1
    assert rows[-1]["faults/redispatched_samples"] > 0
    # Stale samples cannot show the engine/trainer mismatch (before: staleness was reported as rollout/logprob_mismatch);
    # a probe after each verified sync does (the first sync is verified, the next ones every 10)
    assert rows[0]["rollout/logprob_mismatch"] < 1e-3 and "rollout/logprob_mismatch" not in rows[1]
    trained, expected = _trained(tmp_path / "async"), _uninterrupted(train_file, 8, 8, 4)
    assert sorted(trained) == list(range(1, 9))
    for step, samples in trained.items():
        assert samples == expected[step] and set(samples.values()) == {1}, step
        versions = {s["weight_version"] for s in read_samples(tmp_path / "async" / "samples" / f"step_{step}.jsonl")}
        assert versions == {max(0, step - 2)}, (step, versions)  # one weight version per batch, restarted or not


def test_asynchronous_mode_losing_every_worker_after_an_update_checkpoints_that_step(ray_local: None, tmp_path: Path) -> None:
    """Before: a loss found after the step's update (at the wait before the sync) kept only the last periodic
    checkpoint, so the steps since were lost. Now the job checkpoints the step it just trained, with the batches
    that finished, and stops; resumed, it runs every step once."""
    def kill_the_worker(chaos: Chaos) -> None:
        chaos.steps_done(3)
        chaos.kill_mid_rollout("rollout-0")

    job = (*ASYNC, "faults.max_restarts=0", "faults.restart_timeout_s=20")
    chaos = Chaos(tmp_path / "lost", kill_the_worker)
    with pytest.raises(WorkersLost, match=r"checkpoint .*step_(\d+); continue with --resume"):
        chaos.during(lambda: train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "lost", *job))
    written = [r["step"] for r in read_metrics(tmp_path / "lost" / "metrics.jsonl")]
    assert (tmp_path / "lost/checkpoints/latest").read_text().strip() == f"step_{written[-1]}" and written[-1] >= 3
    resumed = train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "lost", *job, resume=True)
    assert [r["step"] for r in resumed] == list(range(1, 9))


# -------------------------------------------------------------------------------- 5. failure budget

def test_a_reward_that_stops_scoring_stops_the_job_after_a_checkpoint(ray_local: None, tmp_path: Path) -> None:
    """Before: a reward whose process kept failing trained on nothing to the end (reward/failed 16 of 16)."""
    path = tmp_path / "fading.py"
    path.write_text("from pathlib import Path\nCALLS = Path(__file__).with_suffix('.calls')\n"
                    "def reward(prompts, responses, **_):\n"
                    "    n = int(CALLS.read_text()) if CALLS.exists() else 0\n"
                    "    CALLS.write_text(str(n + 1))\n"
                    "    return [0.5 if n < 4 else None for _ in responses]\n")
    with pytest.raises(FailureBudgetExceeded, match=r"could not be scored .*faults.max_failed_frac=0.5.*checkpoint .*step_"):
        train("cluster_configs/local-cpu/grpo.yaml", tmp_path, "fading", f"reward.function={path}:reward", "data.eval=null",
              "schedule.steps=10", "schedule.prompts_per_step=8", "rollout.micro_batch_size=8", "checkpoint.every=0")
    rows = read_metrics(tmp_path / "fading" / "metrics.jsonl")
    assert rows[0]["reward/failed"] == 0 and rows[-1]["reward/failed"] == 32 and len(rows) < 10
    assert (tmp_path / "fading/checkpoints/latest").read_text().strip() == f"step_{rows[-1]['step']}"
