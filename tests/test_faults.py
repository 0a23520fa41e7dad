"""The fault-tolerance holes found by review, each a test that failed before its fix (issue 16).

Fast ones first (no Ray): the reward function's child dying, checkpoints re-saved across a crash,
`--resume` without a checkpoint, reusing an output_dir, the failure budget, what a failure means.
Then, on a real local Ray: a transient outage of an actor whose process survives, two scoring
threads seeing one server die, and a trainer group that hung once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from rayrlhf.errors import InvalidInput
from rayrlhf.orchestrator.checkpoint import latest_checkpoint, save_checkpoint
from rayrlhf.orchestrator.faults import COMM, ERROR, UNAVAILABLE, FailureBudget, classify
from rayrlhf.orchestrator.run_dir import claim_output_dir
from rayrlhf.rewards.functions import FunctionRunner, score_with_function

DIES_ONCE = '''
import os
from pathlib import Path

COUNT = Path(__file__).with_suffix(".count")

def reward(prompts, responses, **columns):
    n = int(COUNT.read_text()) if COUNT.exists() else 0
    COUNT.write_text(str(n + 1))
    if n == 3:  # the 4th call kills the process
        os._exit(1)
    return [float(len(r)) for r in responses]

def crash_on_x(prompts, responses, **columns):
    if any("x" in r for r in responses):
        os._exit(1)
    return [float(len(r)) for r in responses]
'''


@pytest.fixture
def reward_file(tmp_path: Path) -> Path:
    path = tmp_path / "dies.py"
    path.write_text(DIES_ONCE)
    return path


def test_a_reward_process_that_dies_is_started_again_and_the_call_scored(reward_file: Path) -> None:
    """Before: every call after the child died returned None for every sample (the job trained on nothing)."""
    runner = FunctionRunner(f"{reward_file}:reward", timeout_s=30)
    try:
        for call in range(6):
            assert score_with_function(runner, ["p", "q"], ["ab", "abc"], {}) == [2.0, 3.0], call
        assert runner.restarts == 1
    finally:
        runner.close()


def test_a_sample_that_kills_the_reward_process_costs_only_itself(reward_file: Path) -> None:
    runner = FunctionRunner(f"{reward_file}:crash_on_x", timeout_s=30)
    try:
        assert score_with_function(runner, ["p"] * 3, ["ab", "xx", "abc"], {}) == [2.0, None, 3.0]
        assert score_with_function(runner, ["p"], ["abcd"], {}) == [4.0]
    finally:
        runner.close()


def _save(root: Path, step: int, tag: str) -> Path:
    def trainers(folder: Path) -> None:
        (folder / "weights.txt").write_text(tag)

    return save_checkpoint(root, step, {"step": step, "tag": tag}, trainers, keep_last=2)


def test_a_crash_while_re_saving_the_latest_step_leaves_a_complete_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """Before: re-saving step N deleted step_N before renaming the new one in; a crash then left `latest` naming
    nothing."""
    root = tmp_path / "checkpoints"
    _save(root, 4, "first")
    real = os.replace

    def crash_after_moving_the_old_one_aside(src, dst):
        if Path(src).name == ".tmp-step_4":
            raise KeyboardInterrupt("killed between the two renames")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash_after_moving_the_old_one_aside)
    with pytest.raises(KeyboardInterrupt):
        _save(root, 4, "second")
    monkeypatch.setattr(os, "replace", real)
    folder = latest_checkpoint(root)
    assert folder == root / "step_4" and (folder / "weights.txt").read_text() == "second"
    assert json.loads((folder / "orchestrator.json").read_text())["tag"] == "second"


def test_pruning_keeps_the_checkpoint_just_written_and_drops_an_abandoned_timeline(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        _save(root, step, "a")
    assert sorted(p.name for p in root.glob("step_*")) == ["step_6", "step_8"]
    _save(root, 7, "b")  # the run went back to step 6 (a trainer rebuild) and saved step 7: step 8 is abandoned
    assert sorted(p.name for p in root.glob("step_*")) == ["step_6", "step_7"]
    assert latest_checkpoint(root) == root / "step_7"


def test_resume_without_a_checkpoint_refuses_and_touches_nothing(tmp_path: Path) -> None:
    """Before: --resume warned, started from scratch and replaced metrics.jsonl."""
    from rayrlhf.launch.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = sorted(p.name for p in out.rglob("*"))
    code = main(["train", "cluster_configs/local-cpu/grpo.yaml", "--set", f"output_dir={out}", "--resume"])
    assert code == 2
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n' and sorted(p.name for p in out.rglob("*")) == before
    with pytest.raises(InvalidInput, match=r"no checkpoint to resume from .*checkpoints.*nothing was changed"):
        claim_output_dir(out, resume=True)


def test_a_new_run_in_a_used_output_dir_refuses_naming_resume(tmp_path: Path) -> None:
    from rayrlhf.launch.cli import main

    out = tmp_path / "run"
    (out / "checkpoints" / "step_2").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 2}\n')
    assert main(["train", "cluster_configs/local-cpu/grpo.yaml", "--set", f"output_dir={out}"]) == 2
    with pytest.raises(InvalidInput, match=r"already holds a run \(metrics.jsonl, checkpoints\).*--resume.*another output_dir"):
        claim_output_dir(out, resume=False)
    assert (out / "metrics.jsonl").read_text() == '{"step": 2}\n'
    assert claim_output_dir(tmp_path / "fresh", resume=False) is None


def test_the_failure_budget_counts_the_failed_share_over_a_window() -> None:
    budget = FailureBudget(max_frac=0.5, window=3)
    assert budget.over({"step": 1, "reward/failed": 8, "rollout/samples": 32}) is None
    assert budget.over({"step": 2, "reward/failed": 16, "rollout/samples": 32}) is None  # 24/64
    message = budget.over({"step": 3, "reward/failed": 32, "env/failed": 0, "rollout/samples": 32})  # 56/96
    assert message and "56 of 96 samples of steps 1-3" in message and "faults.max_failed_frac=0.5" in message
    assert FailureBudget(0.5, 1).over({"step": 1, "reward/failed": 17, "rollout/samples": 32})


def test_what_a_failure_means() -> None:
    import ray

    assert classify(ray.exceptions.ActorUnavailableError("restarting", None)) == UNAVAILABLE
    assert classify(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:4242")) == COMM
    assert classify(ValueError("batch['mask'] has 3 rows")) == ERROR


# ------------------------------------------------------------------------------------- with Ray

def _server_class():
    import ray

    from rayrlhf.actors.health import identity

    @ray.remote(max_restarts=3, max_concurrency=4)
    class Server:
        def ready(self) -> bool:
            return True

        def identity(self) -> tuple[str, int]:
            return identity()

        def score(self, x: int, delay_s: float) -> int:
            time.sleep(delay_s)
            return x * 2

    return Server


def _policy(tmp_path: Path, **knobs):
    from rayrlhf.config import FaultsConfig
    from rayrlhf.orchestrator.faults import FaultPolicy

    return FaultPolicy(FaultsConfig(**{"restart_timeout_s": 120, **knobs}), tmp_path / "faults")


def test_an_actor_that_answers_again_from_the_same_process_after_an_outage_is_restarted_fresh(
    ray_local: None, tmp_path: Path
) -> None:
    """Before: an ActorUnavailableError took the worker out without killing it; its process kept answering with
    the same identity, which the pool read as 'not restarted yet' forever, and it never served again."""
    from rayrlhf.orchestrator.faults import Restartable

    actor = _server_class().remote()
    r = Restartable("server", actor, _policy(tmp_path))
    old = r.ident
    assert r.take_out("ActorUnavailableError: connection reset (a transient outage)", UNAVAILABLE)
    deadline = time.monotonic() + 120
    while not r.poll():
        assert time.monotonic() < deadline, "the actor never came back"
        time.sleep(0.1)
    assert r.ident != old and r.incarnation == 1
    r.back_in_service()
    assert not r.out


def test_two_threads_holding_the_same_answer_that_the_server_is_back_do_not_kill_the_new_process(
    ray_local: None, tmp_path: Path
) -> None:
    """Before: two scoring threads waited on one restarting reference with the same identity probe; the first
    recorded the new process, the second compared the same answer with it, took it for the old process answering
    after an outage and killed it: two restarts for one kill (seen in test_chaos on a loaded machine)."""
    import ray

    from rayrlhf.orchestrator.faults import Restartable

    r = Restartable("server", _server_class().remote(), _policy(tmp_path))
    kills = []
    r._kill = lambda: kills.append(r.ident)  # noqa: SLF001 - record instead of killing
    os.kill(r.ident[1], signal.SIGKILL)
    old = r.ident
    assert r.take_out("died (ActorUnavailableError)", UNAVAILABLE)
    deadline = time.monotonic() + 120
    while True:  # the probes the failure handler sends, until the new process answers one
        assert time.monotonic() < deadline
        probe = r._probe  # noqa: SLF001
        if probe is None:
            time.sleep(0.05)
            continue
        try:
            answer = tuple(ray.get(probe, timeout=120))  # both threads read this answer
        except ray.exceptions.ActorUnavailableError:
            answer = None
        if answer is not None and answer != old:
            break
        assert not r._settle(probe, old, answer)  # noqa: SLF001 - still restarting: it asks again
    assert r._settle(probe, old, answer)  # noqa: SLF001 - the first thread
    assert r._settle(probe, old, answer)  # noqa: SLF001 - the second, with the same answer: nothing to do
    assert kills == [] and r.incarnation == 1 and r.ident == answer


def test_two_threads_that_see_one_server_die_count_one_restart_and_both_get_answers(
    ray_local: None, tmp_path: Path
) -> None:
    """Before: each scoring thread that retried a dead server counted its own restart."""
    from rayrlhf.orchestrator.faults import Restartable, ServerCaller

    actor = _server_class().remote()
    policy = _policy(tmp_path)
    caller = ServerCaller(Restartable("reward-x", actor, policy))
    answers: dict[int, int] = {}

    def call(x: int) -> None:
        answers[x] = caller.call(lambda: actor.score.remote(x, 2.0))

    threads = [threading.Thread(target=call, args=(x,)) for x in (1, 2)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    os.kill(caller.server.ident[1], signal.SIGKILL)
    for t in threads:
        t.join(timeout=180)
    assert answers == {1: 2, 2: 4}
    assert policy.counters.server_restarts == 1 and caller.server.incarnation == 1


def test_a_worker_restarted_by_ray_while_idle_is_noticed_before_the_sync_and_rejoins(
    ray_local: None, tmp_path: Path
) -> None:
    """Before: a node lost between two calls had its rollout worker restarted by Ray on another node; the next
    sync reached the new process and no counter ever said a worker was lost (seen in tests/test_nodes.py)."""
    import ray

    from rayrlhf.orchestrator.workers import WorkerPool

    actors = [_server_class().remote() for _ in range(2)]
    pool = WorkerPool(actors, _policy(tmp_path))
    assert pool.notice_replaced(30) == []  # nothing changed: nothing to do
    os.kill(pool.actors[1].ident[1], signal.SIGKILL)  # while idle: Ray restarts it, no call of ours fails
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline
        try:
            if tuple(ray.get(actors[1].identity.remote())) != pool.actors[1].ident:
                break
        except ray.exceptions.RayActorError:  # restarting
            pass
        time.sleep(0.2)
    assert pool.notice_replaced(30) == [1] and pool.live == [0]
    assert pool.back(120) == [1]  # its new process answers: it rejoins after the caller's verified sync
    pool.rejoin(1)
    assert pool.live == [0, 1] and pool.counters.worker_failures == 1 and pool.counters.worker_restarts == 1
