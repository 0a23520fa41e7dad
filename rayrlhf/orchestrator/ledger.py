"""The rollout ledger: every sample a rollout owes, which worker owes it, and what came back.

Pure Python, no Ray, so each transition is unit-tested on its own (tests/test_ledger.py):

    queued --assign--> dispatched(worker, stream) --arrived--> done
                              |  worker failed, hung, or its stream ended short
                              +--------------------> queued again (only the missing sample indices,
                                                     same request id and seeds)

- `assign` gives queued work to the workers in service, least loaded first (samples owed).
- `arrived` keeps the first copy of each (request, sample index); a late copy from a worker that
  was given up on is dropped, so nothing is trained twice.
- `fail_worker` puts back in the queue what a worker still owed; what it had delivered is kept.
- `hung` names the workers that owe samples and have delivered none for the hang timeout. The
  clock is the arrival time stamped where the sample was received (the worker's drain thread), not
  when the driver got round to it, so a driver busy elsewhere never makes a healthy worker look hung.

A sample of a multi-turn episode is the whole episode: the ledger does not care what a sample is.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from rayrlhf.actors.types import GenerationRequest


@dataclass
class _Entry:
    """One request: what it asks for and which of its samples came back."""

    request: GenerationRequest
    samples: dict[int, Any] = field(default_factory=dict)  # sample index -> the first copy that arrived
    stream: int | None = None  # the stream it is dispatched on; None while queued or done

    def missing(self) -> tuple[int, ...]:
        return tuple(i for i in self.request.sample_indices if i not in self.samples)


@dataclass
class Stream:
    """One dispatch to one worker: the requests it carries (each with the sample indices it was asked for)."""

    worker: int
    requests: list[GenerationRequest]


class RolloutLedger:
    """The owed samples of one rollout (a step's batch, or an evaluation)."""

    def __init__(self, requests: Sequence[GenerationRequest]) -> None:
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError(f"request ids repeat: {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
        self._entries = {r.request_id: _Entry(r) for r in requests}
        self._queue: list[str] = list(ids)
        self.streams: dict[int, Stream] = {}
        self._progress: dict[int, float] = {}  # worker -> last delivery (or when it was given work while idle)
        self._ids = itertools.count()
        self.expected = sum(len(r.sample_indices) for r in requests)
        self.received = 0
        self.requeued_samples = 0

    # ------------------------------------------------------------------------------- state
    @property
    def done(self) -> bool:
        return self.received == self.expected

    @property
    def queued(self) -> int:
        """Samples waiting to be dispatched."""
        return sum(len(self._entries[rid].missing()) for rid in self._queue)

    def owed_by(self, worker: int) -> int:
        """Samples dispatched to `worker` that have not come back."""
        return sum(self._owed(s) for s in self.streams.values() if s.worker == worker)

    def workers_owing(self) -> list[int]:
        return sorted({s.worker for s in self.streams.values() if self._owed(s)})

    def _owed(self, stream: Stream) -> int:
        return sum(1 for r in stream.requests for i in r.sample_indices if i not in self._entries[r.request_id].samples)

    def samples(self) -> dict[str, dict[int, Any]]:
        """Every sample that came back, by request id and sample index."""
        return {rid: dict(e.samples) for rid, e in self._entries.items()}

    # ------------------------------------------------------------------------- transitions
    def assign(self, live: Sequence[int], now: float) -> list[tuple[int, Stream]]:
        """Dispatch every queued request to the workers in `live`, each to the least loaded (samples owed,
        ties to the lowest index). Returns the new (stream id, stream) to start, at most one per worker."""
        if not self._queue or not live:
            return []
        loads = {w: self.owed_by(w) for w in live}
        batches: dict[int, list[GenerationRequest]] = {}
        for rid in self._queue:
            entry = self._entries[rid]
            missing = entry.missing()
            if not missing:
                continue
            request = entry.request if missing == entry.request.sample_indices else replace(entry.request, indices=missing)
            target = min(live, key=lambda w: (loads[w], w))
            batches.setdefault(target, []).append(request)
            loads[target] += len(missing)
        self._queue = []
        started = []
        for worker, requests in sorted(batches.items()):
            sid = next(self._ids)
            if not self.owed_by(worker):  # an idle worker's hang clock starts when it is given work
                self._progress[worker] = now
            stream = Stream(worker, requests)
            self.streams[sid] = stream
            for r in requests:
                self._entries[r.request_id].stream = sid
            started.append((sid, stream))
        return started

    def arrived(self, sid: int, completions: Iterable[Any], at: float) -> list[Any]:
        """Record the samples one stream delivered (stamped `at`, when they were received); returns the fresh ones.
        Samples of a stream given up on are still kept when they fill a hole (first copy wins)."""
        stream = self.streams.get(sid)
        if stream is not None:
            self._progress[stream.worker] = max(at, self._progress.get(stream.worker, at))
        fresh = []
        for c in completions:
            entry = self._entries.get(c.request_id)
            if entry is None or c.sample_index in entry.samples or c.sample_index not in entry.request.sample_indices:
                continue
            entry.samples[c.sample_index] = c
            fresh.append(c)
        self.received += len(fresh)
        return fresh

    def stream_ended(self, sid: int) -> bool:
        """A stream finished; True when it ended still owing samples (its worker should be failed)."""
        stream = self.streams.get(sid)
        if stream is None:
            return False
        if self._owed(stream):
            return True
        del self.streams[sid]
        return False

    def fail_worker(self, worker: int) -> int:
        """`worker` is out: what its streams still owed goes back to the queue (same ids and seeds); returns the
        number of samples requeued. Its streams are forgotten; anything they deliver later is a late copy."""
        requeued = 0
        for sid in [k for k, s in self.streams.items() if s.worker == worker]:
            for r in self.streams.pop(sid).requests:
                entry = self._entries[r.request_id]
                if entry.missing() and r.request_id not in self._queue:
                    self._queue.append(r.request_id)
                    requeued += len(entry.missing())
                entry.stream = None
        self._progress.pop(worker, None)
        self.requeued_samples += requeued
        return requeued

    def hung(self, now: float, timeout_s: float) -> list[int]:
        """Workers that owe samples and have delivered nothing for `timeout_s`."""
        return [w for w in self.workers_owing() if now - self._progress.get(w, now) > timeout_s]

    def status(self, now: float, names: Sequence[str]) -> str:
        """One line for the heartbeat: progress, and what each worker owes and when it last delivered."""
        parts = [f"{names[w]} {self.owed_by(w)} (last sample {now - self._progress.get(w, now):.0f}s ago)"
                 for w in self.workers_owing()]
        queued = self.queued
        return (f"{self.received}/{self.expected} samples; owed by " + (", ".join(parts) or "nobody")
                + (f"; {queued} queued" if queued else ""))
