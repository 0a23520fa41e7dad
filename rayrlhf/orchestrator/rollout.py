"""Streaming rollouts: dispatch least-loaded first, consume completions as they finish, and
score finished micro-batches while generation goes on.

The scoring of a micro-batch (reference log-probs, reward, critic values, the policy's own
log-probs) runs in a small thread pool, so it overlaps the generation of the next one. Each
scoring task records its start and end on the driver's clock, which is how
`timing/overlap_frac` is measured.
"""

from __future__ import annotations

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


def _drain(generator: Any, sink: queue.Queue) -> None:
    """Move one worker's streamed lists of completions into `sink`; errors travel too, and end the rollout."""
    try:
        for ref in generator:
            sink.put(ray.get(ref))
    except Exception as exc:  # noqa: BLE001 - re-raised on the driver thread
        sink.put(exc)
    finally:
        sink.put(_DONE)


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
    workers: Sequence[Any],
    requests: Sequence[GenerationRequest],
    score: Callable[[list[Completion]], Any],
    micro_batch_size: int,
    scoring_threads: int = 2,
) -> tuple[list[tuple[list[Completion], Any]], RolloutTimings]:
    """Generate all `requests` on `workers`; call `score` on the finished samples as soon as at least
    `micro_batch_size` of them are waiting.

    What has arrived is scored together (split over the scoring threads): samples that finish
    one by one are scored in micro-batches while generation goes on, and a burst of samples that
    finish together costs a few scoring calls, not one per micro-batch. Returns (completions,
    score result) per scored batch, in the order they were scored, and the phase timings.
    Nothing is dropped: every sample that was asked for comes back, or the first worker error
    is raised.
    """
    timings = RolloutTimings(gen_start=time.monotonic())
    expected = sum(r.sampling.n for r in requests)
    loads = ray.get([w.load.remote() for w in workers])
    sink: queue.Queue = queue.Queue()
    threads = []
    for worker, assigned in zip(workers, assign_least_loaded(requests, loads), strict=True):
        if assigned:
            gen = worker.generate.options(num_returns="streaming").remote(list(assigned))
            thread = threading.Thread(target=_drain, args=(gen, sink), daemon=True)
            thread.start()
            threads.append(thread)

    def timed(batch: list[Completion]) -> tuple[list[Completion], Any, tuple[float, float]]:
        start = time.monotonic()
        result = score(batch)
        return batch, result, (start, time.monotonic())

    futures: list[Future] = []
    received = 0
    pending: list[Completion] = []
    with ThreadPoolExecutor(max_workers=scoring_threads, thread_name_prefix="score") as pool:
        live = len(threads)
        while live:
            item = sink.get()
            if item is _DONE:
                live -= 1
                continue
            if isinstance(item, Exception):
                raise RuntimeError(f"a rollout worker failed: {item}") from item
            received += len(item)
            pending.extend(item)
            if len(pending) >= micro_batch_size:
                chunks = max(1, min(scoring_threads, len(pending) // micro_batch_size))
                futures += [pool.submit(timed, list(chunk)) for chunk in _split(pending, chunks)]
                pending = []
        timings.gen_end = time.monotonic()
        if pending:
            futures.append(pool.submit(timed, pending))
        results = [f.result() for f in futures]
    if received != expected:
        raise RuntimeError(f"rollout returned {received} of {expected} samples")
    timings.score_intervals = [interval for _, _, interval in results]
    return [(batch, result) for batch, result, _ in results], timings
