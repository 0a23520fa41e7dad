"""The rollout core: generate a batch of requests on the workers in service, score what finishes as it
finishes, and lose nothing when workers fail.

    ledger   <- every sample owed (orchestrator/ledger.py): queued, dispatched to a worker, or back
    loop     <- what arrived (completions, stream errors, stream ends), then once a second: hung workers,
                restarted workers that can rejoin, a heartbeat line
    scoring  <- finished samples, in micro-batches, on a small thread pool while generation goes on

Workers are reached only through the pool (`orchestrator/workers.py`: start a stream, fail, back,
rejoin), so this file is pure control flow, unit-tested with a fake pool (tests/test_rollout_core.py).
The next capability that changes how samples are produced (multi-turn episodes) changes what a worker
streams, not this loop. Each scoring task records its start and end on the driver's clock, which is
how `timing/overlap_frac` is measured.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from rayrlhf.actors.types import Completion, GenerationRequest
from rayrlhf.errors import WorkersLost
from rayrlhf.orchestrator.faults import DIED, TIMEOUT, FaultCounters, Heartbeat
from rayrlhf.orchestrator.ledger import RolloutLedger
from rayrlhf.orchestrator.workers import END, StreamError

log = logging.getLogger(__name__)

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


class Pool(Protocol):
    """What the rollout core needs of the workers (`workers.WorkerPool`; a fake one in the tests)."""

    names: list[str]
    counters: FaultCounters
    hang_timeout_s: float
    restart_timeout_s: float
    heartbeat_s: float

    @property
    def live(self) -> list[int]: ...
    def start(self, worker: int, requests: list[GenerationRequest], sid: int, sink: queue.Queue) -> None: ...
    def fail(self, worker: int, reason: str, kind: str = ...) -> bool: ...
    def back(self, timeout_s: float = 0.0) -> list[int]: ...
    def describe(self) -> str: ...


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
    pool: Pool,
    requests: Sequence[GenerationRequest],
    score: Callable[[list[Completion]], Any],
    micro_batch_size: int,
    scoring_threads: int = 2,
    rejoin: Callable[[int], None] | None = None,
    label: str = "the rollout",
    expected_version: int | None = None,
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
    `rejoin(i)` (push the weights this rollout samples with into restarted worker i, verify them,
    and put it back in service) lets restarted workers serve again mid-rollout; without it they
    wait for the next weight sync. A request the engine rejects (e.g. too long a prompt) fails the rollout.
    A sample of another weight version than `expected_version` comes from a worker that died and came back
    between two calls without the driver seeing it (it holds its initial weights): it is dropped and the
    worker handled as failed, so it rejoins only through a verified sync.
    """
    timings = RolloutTimings(gen_start=time.monotonic())
    ledger = RolloutLedger(requests)
    sink: queue.Queue = queue.Queue()

    def dispatch() -> None:
        if ledger.queued and not pool.live:
            wait_for_a_worker()
        for sid, stream in ledger.assign(pool.live, time.monotonic()):
            pool.start(stream.worker, stream.requests, sid, sink)

    def fail(worker: int, reason: str, kind: str) -> None:
        """`worker` is out: what it still owed goes to the workers in service (same request ids and seeds)."""
        pool.fail(worker, f"{label}: {reason}", kind)
        requeued = ledger.fail_worker(worker)
        if requeued:
            pool.counters.add("redispatched_samples", requeued)
            log.warning("%s: %d sample(s) re-sent after %s failed", label, requeued, pool.names[worker])
        dispatch()  # may first wait for a restarted worker (or raise WorkersLost)

    def readmit(timeout_s: float = 0.0) -> None:
        if rejoin is not None:
            for i in pool.back(timeout_s):
                rejoin(i)

    def wait_for_a_worker() -> None:
        """Every worker is out: wait for a restarted one and bring it up to date, within the bound."""
        readmit(pool.restart_timeout_s)
        if not pool.live:
            raise WorkersLost(
                f"{label}: no rollout worker is left in service ({pool.describe()}) and none came back within "
                f"faults.restart_timeout_s={pool.restart_timeout_s:.0f}s"
                + ("" if rejoin is not None else "; restarted workers rejoin only at a weight sync here")
            )

    def handle(sid: int, item: Any, at: float) -> list[Completion]:
        stream = ledger.streams.get(sid)
        if isinstance(item, StreamError):
            if item.kind == "rejected":  # the engine refused a request: the input is wrong, retrying cannot help
                raise RuntimeError(f"a rollout worker failed: {item.message}")
            if stream is not None:
                fail(stream.worker, item.message, item.kind)
            return []
        if item == END:
            if stream is not None and ledger.stream_ended(sid):
                fail(stream.worker, "its generate call ended without all its samples", "error")
            return []
        stale = [c for c in item if expected_version is not None and c.weight_version != expected_version]
        if stale:
            if stream is not None:
                fail(stream.worker, f"it restarted unnoticed: its samples carry weight version {stale[0].weight_version}, "
                     f"this rollout samples with {expected_version}", DIED)
            return []
        return ledger.arrived(sid, item, at)

    def timed(batch: list[Completion]) -> tuple[list[Completion], Any, tuple[float, float]]:
        start = time.monotonic()
        result = score(batch)
        return batch, result, (start, time.monotonic())

    dispatch()
    heartbeat = Heartbeat(pool.heartbeat_s, label)
    futures: list[Future] = []
    pending: list[Completion] = []
    last_check = time.monotonic()
    with ThreadPoolExecutor(max_workers=scoring_threads, thread_name_prefix="score") as executor:
        while not ledger.done:
            items = []  # everything that has arrived, first: its arrival times are what the hang check reads
            try:
                items.append(sink.get(timeout=1.0))
                while True:
                    items.append(sink.get_nowait())
            except queue.Empty:
                pass
            for sid, item, at in items:
                pending.extend(handle(sid, item, at))
            if len(pending) >= micro_batch_size:
                chunks = max(1, min(scoring_threads, len(pending) // micro_batch_size))
                futures += [executor.submit(timed, list(chunk)) for chunk in _split(pending, chunks)]
                pending = []
            now = time.monotonic()
            if now - last_check >= 1.0:  # once a second, even while other workers keep delivering
                last_check = now
                for w in ledger.hung(now, pool.hang_timeout_s):
                    if w in pool.live:
                        fail(w, f"no sample for over {pool.hang_timeout_s:.0f}s (faults.generation_timeout_s)", TIMEOUT)
                readmit()
                if ledger.queued and pool.live:
                    dispatch()
                heartbeat.beat(lambda: ledger.status(time.monotonic(), pool.names))
        timings.gen_end = time.monotonic()
        if pending:
            futures.append(executor.submit(timed, pending))
        results = [f.result() for f in futures]
    timings.score_intervals = [interval for _, _, interval in results]
    return [(batch, result) for batch, result, _ in results], timings
