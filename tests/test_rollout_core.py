"""The rollout core without Ray: the ledger's transitions, and `stream_rollouts` driving fake workers that
deliver, die, hang, fail their engine and come back.

The fake pool has the real pool's interface (start a stream, fail, back, rejoin); its workers are threads
that put samples into the core's sink with the real arrival stamps, so dispatch, re-dispatch, duplicate
suppression, hang detection and rejoin are the real code paths.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter

import pytest

from rayrlhf.actors.types import Completion, GenerationRequest, SamplingSpec
from rayrlhf.errors import WorkersLost
from rayrlhf.orchestrator.faults import DIED, TIMEOUT, FaultCounters
from rayrlhf.orchestrator.ledger import RolloutLedger
from rayrlhf.orchestrator.rollout import stream_rollouts
from rayrlhf.orchestrator.workers import END, StreamError


def _requests(n: int, samples: int = 4) -> list[GenerationRequest]:
    return [GenerationRequest(f"r{i}", [1, 2, i], SamplingSpec(n=samples, seed=100 * i)) for i in range(n)]


def _completion(request: GenerationRequest, index: int, worker: str = "") -> Completion:
    return Completion(request.request_id, index, list(request.prompt_ids), [request.sampling.seed + index], [-1.0],
                      "stop", 0, worker)


# ------------------------------------------------------------------------------------------- ledger


def test_ledger_assigns_least_loaded_and_keeps_each_sample_once() -> None:
    reqs = _requests(4)
    ledger = RolloutLedger(reqs)
    started = ledger.assign([0, 1], now=0.0)
    assert [(s.worker, [r.request_id for r in s.requests]) for _, s in started] == [(0, ["r0", "r2"]), (1, ["r1", "r3"])]
    (sid0, _), (sid1, _) = started
    fresh = ledger.arrived(sid0, [_completion(reqs[0], 0), _completion(reqs[0], 0), _completion(reqs[0], 1)], at=1.0)
    assert [(c.request_id, c.sample_index) for c in fresh] == [("r0", 0), ("r0", 1)]
    assert ledger.received == 2 and ledger.owed_by(0) == 6 and ledger.owed_by(1) == 8


def test_ledger_requeues_only_the_missing_samples_of_a_failed_worker_with_the_same_seeds() -> None:
    reqs = _requests(2)
    ledger = RolloutLedger(reqs)
    (sid0, _), _ = ledger.assign([0, 1], now=0.0)
    ledger.arrived(sid0, [_completion(reqs[0], 0), _completion(reqs[0], 2)], at=1.0)
    assert ledger.fail_worker(0) == 2 and ledger.queued == 2
    [(sid, stream)] = ledger.assign([1], now=2.0)
    [again] = stream.requests
    assert (again.request_id, again.sample_indices, again.sampling.seed) == ("r0", (1, 3), 0)
    late = ledger.arrived(sid0, [_completion(reqs[0], 1)], at=3.0)  # the failed worker's late copy fills the hole
    assert [c.sample_index for c in late] == [1]
    assert ledger.arrived(sid, [_completion(reqs[0], 1), _completion(reqs[0], 3)], at=4.0)[0].sample_index == 3
    assert ledger.stream_ended(sid) is False


def test_ledger_hang_clock_uses_arrival_stamps_and_starts_when_an_idle_worker_gets_work() -> None:
    reqs = _requests(2)
    ledger = RolloutLedger(reqs)
    (sid0, _), (sid1, _) = ledger.assign([0, 1], now=10.0)
    ledger.arrived(sid0, [_completion(reqs[0], 0)], at=14.0)
    assert ledger.hung(now=15.5, timeout_s=5.0) == [1]  # worker 1 delivered nothing since it got work at 10
    assert ledger.hung(now=15.5, timeout_s=6.0) == []
    assert ledger.stream_ended(sid1) is True  # ended owing samples


def test_ledger_any_interleaving_ends_with_every_sample_exactly_once() -> None:
    """A seeded random walk over dispatch, delivery (with duplicates and late copies) and failures."""
    import random

    for seed in range(30):
        rng = random.Random(seed)
        reqs = _requests(6, samples=3)
        ledger = RolloutLedger(reqs)
        alive = {0, 1, 2}
        while not ledger.done:
            live = sorted(alive) or [rng.randrange(3)]
            alive |= set(live)
            ledger.assign(live, now=0.0)
            sid, stream = rng.choice(list(ledger.streams.items())) if ledger.streams else (None, None)
            if stream is None:
                continue
            action = rng.random()
            if action < 0.15:
                ledger.fail_worker(stream.worker)
                alive.discard(stream.worker)
            else:
                r = rng.choice(stream.requests)
                ledger.arrived(sid, [_completion(r, rng.choice(r.sample_indices))], at=0.0)
        got = ledger.samples()
        assert sorted((rid, i) for rid, s in got.items() for i in s) == sorted(
            (r.request_id, i) for r in reqs for i in range(3)), seed


# ------------------------------------------------------------------------------------------ the core


class FakePool:
    """Workers as threads. Each has a behaviour per stream: deliver, die after k samples, hang, or fail its engine."""

    def __init__(self, n: int, hang_timeout_s: float = 1.0, restart_s: float = 0.3, delay_s: float = 0.01) -> None:
        self.names = [f"rollout-{i}" for i in range(n)]
        self.counters = FaultCounters()
        self.hang_timeout_s, self.restart_timeout_s, self.heartbeat_s = hang_timeout_s, 5.0, 60.0
        self.delay_s, self.restart_s = delay_s, restart_s
        self.out: dict[int, float] = {}  # worker -> when it will be up again
        self.plan: dict[int, list[str]] = {}  # worker -> behaviours of its next streams
        self.served: Counter = Counter()  # (worker) -> samples delivered
        self.failures: list[tuple[int, str]] = []
        self.rejoined: list[int] = []
        self.lock = threading.Lock()
        self.engine = [threading.Lock() for _ in range(n)]  # one engine per worker: its streams take turns

    @property
    def live(self) -> list[int]:
        return [i for i in range(len(self.names)) if i not in self.out]

    def describe(self) -> str:
        return f"out: {sorted(self.out)}"

    def start(self, worker: int, requests: list[GenerationRequest], sid: int, sink: queue.Queue) -> None:
        behaviour = self.plan.get(worker, []).pop(0) if self.plan.get(worker) else "deliver"

        def run() -> None:
            delivered = 0
            for r in requests:
                for i in r.sample_indices:
                    with self.engine[worker]:
                        time.sleep(self.delay_s)
                    if behaviour.startswith("die") and delivered == int(behaviour.split(":")[1]):
                        sink.put((sid, StreamError(DIED, "ActorDiedError"), time.monotonic()))
                        sink.put((sid, END, time.monotonic()))
                        return
                    if behaviour == "hang" and delivered == 1:
                        time.sleep(3600)
                    if behaviour == "engine" and delivered == 2:
                        sink.put((sid, StreamError("error", "RuntimeError: engine failed"), time.monotonic()))
                        sink.put((sid, END, time.monotonic()))
                        return
                    if behaviour == "stale":  # restarted unnoticed: it samples with its initial weights
                        c = _completion(r, i, self.names[worker])
                        c.weight_version = 9
                        sink.put((sid, [c], time.monotonic()))
                        sink.put((sid, END, time.monotonic()))
                        return
                    if behaviour == "short" and delivered == 1:
                        sink.put((sid, END, time.monotonic()))
                        return
                    sink.put((sid, [_completion(r, i, self.names[worker])], time.monotonic()))
                    with self.lock:
                        self.served[worker] += 1
                    delivered += 1
            sink.put((sid, END, time.monotonic()))

        threading.Thread(target=run, daemon=True).start()

    def fail(self, worker: int, reason: str, kind: str = "error") -> bool:
        if worker in self.out:
            return False
        self.out[worker] = time.monotonic() + self.restart_s
        self.failures.append((worker, kind))
        self.counters.add("worker_failures")
        return True

    def back(self, timeout_s: float = 0.0) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while True:
            ready = [w for w, t in self.out.items() if time.monotonic() >= t]
            if ready or not self.out or time.monotonic() >= deadline:
                return ready
            time.sleep(0.02)

    def rejoin(self, worker: int) -> None:
        del self.out[worker]
        self.rejoined.append(worker)
        self.counters.add("worker_restarts")


def _run(pool: FakePool, reqs: list[GenerationRequest], rejoin=None, **kwargs):
    scored, _ = stream_rollouts(pool, reqs, lambda batch: {"n": len(batch)}, micro_batch_size=4, rejoin=rejoin,
                                expected_version=0, **kwargs)
    keys = [(c.request_id, c.sample_index) for batch, _ in scored for c in batch]
    return keys, scored


def _every(reqs: list[GenerationRequest]) -> list[tuple[str, int]]:
    return sorted((r.request_id, i) for r in reqs for i in range(r.sampling.n))


def test_core_delivers_every_sample_once_on_healthy_workers() -> None:
    pool = FakePool(2)
    reqs = _requests(6)
    keys, scored = _run(pool, reqs)
    assert sorted(keys) == _every(reqs) and sum(r["n"] for _, r in scored) == 24
    assert pool.served[0] == pool.served[1] == 12  # least-loaded dispatch splits evenly


@pytest.mark.parametrize("behaviour", ["die:3", "engine", "short", "stale"])
def test_core_re_sends_what_a_failed_worker_owed(behaviour: str) -> None:
    pool = FakePool(2)
    pool.plan[0] = [behaviour]
    reqs = _requests(6)
    keys, scored = _run(pool, reqs, rejoin=pool.rejoin)
    assert sorted(keys) == _every(reqs)  # none lost, none twice
    assert pool.failures[0][0] == 0 and pool.counters.redispatched_samples > 0
    assert all(c.weight_version == 0 for batch, _ in scored for c in batch)  # a stale worker's samples are dropped


def test_core_finds_a_hung_worker_and_a_restarted_one_rejoins_mid_rollout() -> None:
    pool = FakePool(2, hang_timeout_s=0.5, restart_s=0.2, delay_s=0.02)
    pool.plan[1] = ["hang"]
    reqs = _requests(48)  # long enough for the restarted worker to come back (the core looks once a second)
    keys, _ = _run(pool, reqs, rejoin=pool.rejoin)
    assert sorted(keys) == _every(reqs)
    assert pool.failures == [(1, TIMEOUT)] and pool.rejoined == [1]


def test_core_waits_for_a_restarted_worker_when_none_is_in_service_and_gives_up_after_the_bound() -> None:
    pool = FakePool(1, restart_s=0.3)
    pool.plan[0] = ["die:2"]
    reqs = _requests(3)
    keys, _ = _run(pool, reqs, rejoin=pool.rejoin)
    assert sorted(keys) == _every(reqs) and pool.rejoined == [0]
    lost = FakePool(1, restart_s=60.0)
    lost.restart_timeout_s = 0.3
    lost.plan[0] = ["die:2"]
    with pytest.raises(WorkersLost, match="no rollout worker is left in service"):
        _run(lost, _requests(3), rejoin=lost.rejoin)


def test_a_driver_blocked_longer_than_the_hang_timeout_does_not_make_healthy_workers_hung() -> None:
    """The loop is stuck in a slow rejoin (3x the hang timeout) while the other worker keeps delivering."""
    pool = FakePool(2, hang_timeout_s=0.4, restart_s=0.05, delay_s=0.02)
    pool.plan[0] = ["die:1"]
    slow: list[int] = []

    def slow_rejoin(worker: int) -> None:
        time.sleep(1.2)
        slow.append(worker)
        pool.rejoin(worker)

    reqs = _requests(40)
    keys, _ = _run(pool, reqs, rejoin=slow_rejoin)
    assert sorted(keys) == _every(reqs)
    assert slow == [0]  # the loop did block in the rejoin
    assert pool.failures == [(0, DIED)]  # and worker 1 was never declared hung


def test_a_rejected_request_fails_the_rollout_with_the_engines_message() -> None:
    class Rejecting(FakePool):
        def start(self, worker, requests, sid, sink):
            sink.put((sid, StreamError("rejected", "ValueError: prompt too long"), time.monotonic()))
            sink.put((sid, END, time.monotonic()))

    with pytest.raises(RuntimeError, match="prompt too long"):
        _run(Rejecting(1), _requests(1))
