"""Streaming rollouts: dispatch least-loaded first, consume completions as they finish, and
score finished micro-batches while generation goes on.

The scoring of a micro-batch (reference log-probs, reward, critic values, the policy's own
log-probs) runs in a small thread pool, so it overlaps the generation of the next one. Each
scoring task records its start and end on the driver's clock, which is how
`timing/overlap_frac` is measured.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import ray

from rayrlhf.actors.types import Completion, GenerationRequest
from rayrlhf.errors import WorkersLost
from rayrlhf.orchestrator.faults import Heartbeat, WorkerPool

log = logging.getLogger(__name__)

_DONE = object()


@dataclass
class RolloutTimings:
    """Wall-clock intervals of one step's rollout phase, on the driver's clock."""

    gen_start: float = 0.0
    gen_end: float = 0.0
    score_intervals: list[tuple[float, float]] = field(default_factory=list)

    @property
    def score_s(self) -> float:
        return sum(b - a for a, b in self.score_intervals)

    @property
    def overlap_frac(self) -> float:
        """Share of scoring time that ran while generation was still going."""
        total = self.score_s
        if total <= 0:
            return 0.0
        overlap = sum(max(0.0, min(b, self.gen_end) - max(a, self.gen_start)) for a, b in self.score_intervals)
        return overlap / total


def assign_least_loaded(requests: Sequence[GenerationRequest], loads: Sequence[int]) -> list[list[GenerationRequest]]:
    """Give each request to the worker with the fewest samples in flight (current load plus assigned)."""
    pending = list(loads)
    out: list[list[GenerationRequest]] = [[] for _ in loads]
    for req in requests:
        target = min(range(len(pending)), key=lambda i: (pending[i], i))
        out[target].append(req)
        pending[target] += req.sampling.n
    return out


def collect(worker: Any, requests: Sequence[GenerationRequest]) -> list[Completion]:
    """Every completion of `requests` from one worker, in the order they finished."""
    return [c for ref in worker.generate.options(num_returns="streaming").remote(list(requests)) for c in ray.get(ref)]


def _drain(generator: Any, stream: int, sink: queue.Queue) -> None:
    """Move one worker stream's lists of completions into `sink`, tagged with the stream; errors travel too."""
    try:
        for ref in generator:
            sink.put((stream, ray.get(ref)))
    except Exception as exc:  # noqa: BLE001 - handled on the driver thread
        sink.put((stream, exc))
    finally:
        sink.put((stream, _DONE))


@dataclass
class _Stream:
    """One `generate` call in flight: its worker and the ids of the requests it carries."""

    worker: int
    request_ids: list[str]


def _split(items: list, n: int) -> list[list]:
    """`items` in `n` contiguous, nearly equal chunks."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


def stream_rollouts(
    pool: WorkerPool,
    requests: Sequence[GenerationRequest],
    score: Callable[[list[Completion]], Any],
    micro_batch_size: int,
    scoring_threads: int = 2,
    rejoin: Callable[[int], None] | None = None,
    label: str = "the rollout",
) -> tuple[list[tuple[list[Completion], Any]], RolloutTimings]:
    """Generate all `requests` on the pool's workers; call `score` on the finished samples as soon as
    at least `micro_batch_size` of them are waiting.

    What has arrived is scored together (split over the scoring threads): samples that finish
    one by one are scored in micro-batches while generation goes on, and a burst of samples that
    finish together costs a few scoring calls, not one per micro-batch. Returns (completions,
    score result) per scored batch, in the order they were scored, and the phase timings.

    Nothing is lost or duplicated: when a worker dies, hangs (no sample for the pool's hang
    timeout) or its engine fails, the samples it still owed are asked of the workers in service,
    under the same request ids and seeds, and each (request, sample index) is kept once.
    `rejoin(i)` (on-policy: push the current weights into restarted worker i and verify them)
    lets restarted workers serve again mid-rollout; without it they wait for the next weight
    sync. A request the engine rejects (e.g. too long a prompt) fails the rollout.
    """
    timings = RolloutTimings(gen_start=time.monotonic())
    by_id = {r.request_id: r for r in requests}
    got: dict[str, set[int]] = {rid: set() for rid in by_id}
    expected = sum(r.sampling.n for r in requests)
    sink: queue.Queue = queue.Queue()
    streams: dict[int, _Stream] = {}
    last_sample: dict[int, float] = {}  # worker -> when it last returned a sample (or was given work)
    counter = itertools.count()

    def owed(rids: Sequence[str]) -> int:
        return sum(by_id[r].sampling.n - len(got[r]) for r in rids)

    def dispatch(todo: Sequence[GenerationRequest]) -> None:
        if not pool.live:
            wait_for_a_worker()
        live = list(pool.live)
        loads = {i: 0 for i in live}
        for s in streams.values():
            if s.worker in loads:
                loads[s.worker] += owed(s.request_ids)
        for i, assigned in zip(live, assign_least_loaded(todo, [loads[i] for i in live]), strict=True):
            if assigned:
                sid = next(counter)
                if not any(s.worker == i for s in streams.values()):
                    last_sample[i] = time.monotonic()
                streams[sid] = _Stream(i, [r.request_id for r in assigned])
                gen = pool.workers[i].generate.options(num_returns="streaming").remote(list(assigned))
                threading.Thread(target=_drain, args=(gen, sid, sink), daemon=True).start()

    def fail(i: int, reason: str, kill: bool, hung: bool = False) -> None:
        """Worker i is out: re-send what it still owed to the workers in service."""
        rids = [r for sid in [k for k, s in streams.items() if s.worker == i] for r in streams.pop(sid).request_ids]
        pool.fail(i, reason, kill=kill, hung=hung)
        todo = [by_id[r] for r in rids if len(got[r]) < by_id[r].sampling.n]
        if todo:
            dispatch(todo)  # may first wait for a restarted worker (or raise WorkersLost)
            pool.counters.add("redispatched_samples", owed([r.request_id for r in todo]))
            log.warning("%s: %d sample(s) of %d request(s) re-sent after %s failed", label, owed(rids), len(todo),
                        pool.names[i])

    def readmit(timeout_s: float = 0.0) -> None:
        if rejoin is not None:
            for i in pool.back(timeout_s):
                rejoin(i)

    def wait_for_a_worker() -> None:
        """Every worker is down: (on-policy) wait for a restarted one and bring it up to date, within the bound."""
        if rejoin is not None:
            readmit(pool.restart_timeout_s)
        if not pool.live:
            raise WorkersLost(
                f"{label}: no rollout worker is left in service (lost for good: {sorted(pool.lost)}, still restarting: "
                f"{pool.restarting}) and none came back within faults.restart_timeout_s={pool.restart_timeout_s:.0f}s"
                + ("" if rejoin is not None else "; in asynchronous mode restarted workers rejoin only at a weight sync")
            )

    def status() -> str:
        owing: dict[int, int] = {}
        for s in streams.values():
            owing[s.worker] = owing.get(s.worker, 0) + owed(s.request_ids)
        now = time.monotonic()
        return f"{expected - owed(list(by_id))}/{expected} samples; owed by " + ", ".join(
            f"{pool.names[i]} {n} (last sample {now - last_sample[i]:.0f}s ago)" for i, n in sorted(owing.items()))

    def timed(batch: list[Completion]) -> tuple[list[Completion], Any, tuple[float, float]]:
        start = time.monotonic()
        result = score(batch)
        return batch, result, (start, time.monotonic())

    dispatch(list(requests))
    heartbeat = Heartbeat(pool.heartbeat_s, label)
    futures: list[Future] = []
    received = 0
    pending: list[Completion] = []
    last_check = time.monotonic()
    with ThreadPoolExecutor(max_workers=scoring_threads, thread_name_prefix="score") as executor:
        while received < expected:
            now = time.monotonic()
            if now - last_check >= 1.0:  # once a second, even while other workers keep delivering
                last_check = now
                for i in sorted({s.worker for s in streams.values()}):
                    if now - last_sample[i] > pool.hang_timeout_s and i in pool.live:
                        fail(i, f"no sample for {now - last_sample[i]:.0f}s (faults.generation_timeout_s)", kill=True, hung=True)
                readmit()
                heartbeat.beat(status)
            try:
                sid, item = sink.get(timeout=1.0)
            except queue.Empty:
                continue
            stream = streams.get(sid)
            if stream is None:  # a stream given up on after its worker failed
                continue
            if item is _DONE:
                if owed(stream.request_ids):  # ended without its samples and without an error
                    fail(stream.worker, "its generate call ended early", kill=True)
                else:
                    del streams[sid]
                continue
            if isinstance(item, Exception):
                if isinstance(item, ValueError):  # the engine rejected a request: the input is wrong
                    raise RuntimeError(f"a rollout worker failed: {item}") from item
                dead = isinstance(item, ray.exceptions.RayActorError)
                fail(stream.worker, f"{'the actor died' if dead else 'the engine failed'}: {item!r}"[:500], kill=not dead)
                continue
            last_sample[stream.worker] = time.monotonic()
            fresh = []
            for c in item:
                if c.sample_index not in got[c.request_id]:  # a re-sent request's samples that had come back are dropped
                    got[c.request_id].add(c.sample_index)
                    fresh.append(c)
            received += len(fresh)
            pending.extend(fresh)
            if len(pending) >= micro_batch_size:
                chunks = max(1, min(scoring_threads, len(pending) // micro_batch_size))
                futures += [executor.submit(timed, list(chunk)) for chunk in _split(pending, chunks)]
                pending = []
        timings.gen_end = time.monotonic()
        if pending:
            futures.append(executor.submit(timed, pending))
        results = [f.result() for f in futures]
    timings.score_intervals = [interval for _, _, interval in results]
    return [(batch, result) for batch, result, _ in results], timings
