"""The rollout workers as the rollout core sees them: which are in service, and their streams.

`WorkerPool` is the only place that knows rollout workers are Ray actors. The rollout core
(`orchestrator/rollout.py`) asks it to start a stream of samples on a worker (`start`), to take a worker
out of service (`fail`), which restarted workers are ready (`back`) and to put one back (`rejoin`, after
the caller pushed the current weights into it and verified them). Tests drive the same core with a
fake pool that has these methods and no Ray (tests/test_rollout_core.py).

A stream's items reach the core's sink as `(stream id, item, arrival time)`: a list of completions, a
`StreamError`, or `END`. The arrival time is stamped by the thread that received the item, which is
what hang detection reads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray

from rayrlhf.actors.types import Completion, GenerationRequest
from rayrlhf.orchestrator.faults import DIED, ERROR, FaultPolicy, Restartable, classify

log = logging.getLogger(__name__)

END = "end"  # a stream's last item


@dataclass
class StreamError:
    """A stream failed. `kind`: "rejected" (the engine refused a request: the input is wrong, the rollout
    fails) or a `faults.classify` kind (the worker is out: what it owed goes to the others)."""

    kind: str
    message: str


def _drain(generator: Any, sid: int, sink: queue.Queue) -> None:
    """Move one worker stream's items into `sink`, stamped with their arrival time; errors travel too."""
    try:
        for ref in generator:
            sink.put((sid, ray.get(ref), time.monotonic()))
    except Exception as exc:  # noqa: BLE001 - handled on the driver thread
        cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
        kind = "rejected" if isinstance(cause, ValueError) else classify(exc)
        sink.put((sid, StreamError(kind, f"{type(exc).__name__}: {exc}"[:800]), time.monotonic()))
    sink.put((sid, END, time.monotonic()))


class WorkerPool:
    """The rollout workers and which of them are in service.

    A worker that fails leaves service at once (`fail`); it is killed if its process may still be alive,
    Ray starts a new process (faults.max_restarts), and `back()` reports it once its engine is up. It
    re-enters service through `rejoin`, which the caller does only after pushing the current weights into
    it and verifying them.
    """

    def __init__(self, workers: Sequence[Any], policy: FaultPolicy) -> None:
        self.workers = list(workers)
        self.names = [f"rollout-{i}" for i in range(len(self.workers))]
        self.policy = policy
        self.counters = policy.counters
        self.hang_timeout_s = policy.generation_timeout_s
        self.restart_timeout_s, self.heartbeat_s = policy.cfg.restart_timeout_s, policy.cfg.heartbeat_s
        idents = ray.get([w.identity.remote() for w in self.workers], timeout=policy.cfg.restart_timeout_s)
        self.actors = [Restartable(n, w, policy, tuple(i)) for n, w, i in zip(self.names, self.workers, idents, strict=True)]
        self._lock = threading.RLock()

    @property
    def live(self) -> list[int]:
        """Workers in service."""
        return [i for i, a in enumerate(self.actors) if not a.out and not a.lost]

    @property
    def lost(self) -> list[int]:
        return [i for i, a in enumerate(self.actors) if a.lost]

    @property
    def restarting(self) -> list[int]:
        return [i for i, a in enumerate(self.actors) if a.out and not a.lost]

    def in_service(self) -> list[Any]:
        return [self.workers[i] for i in self.live]

    def start(self, worker: int, requests: list[GenerationRequest], sid: int, sink: queue.Queue) -> None:
        """Stream the samples of `requests` from `worker` into `sink` (a thread drains the stream)."""
        gen = self.workers[worker].generate.options(num_returns="streaming").remote(list(requests))
        threading.Thread(target=_drain, args=(gen, sid, sink), name=f"drain-{self.names[worker]}", daemon=True).start()

    def fail(self, worker: int, reason: str, kind: str = ERROR) -> bool:
        """Take `worker` out of service after a failure of `kind` (a hung one is dumped, then killed, off this
        thread). False when it was already out."""
        if not self.actors[worker].take_out(reason, kind):
            return False
        self.counters.add("worker_failures")
        return True

    def notice_replaced(self, timeout_s: float) -> list[int]:
        """Workers in service whose process changed since we last saw it (Ray restarted it between two calls:
        its process or its node was lost while it was idle). Each is taken out of service like any failure, so
        it rejoins through a verified sync and both the failure and the restart are counted. One identity call
        per worker, in parallel; a worker that does not answer within `timeout_s` is left to the usual checks."""
        live = self.live
        probes = {i: self.workers[i].identity.remote() for i in live}
        ready, _ = ray.wait(list(probes.values()), num_returns=len(probes), timeout=timeout_s)
        replaced = []
        for i, probe in probes.items():
            if probe not in ready:
                continue
            try:
                ident = tuple(ray.get(probe))
            except Exception as exc:  # noqa: BLE001 - died or unavailable: out of service like any failure
                self.fail(i, f"before the weight sync: {type(exc).__name__}: {exc}"[:600], classify(exc))
                continue
            if ident != self.actors[i].ident and self.fail(i, "its process was replaced by Ray between calls (the process "
                                                          "or its node was lost)", DIED):
                replaced.append(i)
        return replaced

    def back(self, timeout_s: float = 0.0) -> list[int]:
        """Restarted workers whose engine is up, waiting up to `timeout_s` for the first; they are not in
        service until `rejoin`. A worker past its restarts is reported lost (and stays out)."""
        deadline = time.monotonic() + timeout_s
        while True:
            ready = [i for i in self.restarting if self.actors[i].poll()]
            if ready or not self.restarting or time.monotonic() >= deadline:
                return ready
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def rejoin(self, worker: int) -> None:
        """Put restarted `worker` back in service (its weights are the current ones, verified)."""
        self.actors[worker].back_in_service()
        self.counters.add("worker_restarts")
        log.warning("%s is back in service after a restart", self.names[worker])

    def describe(self) -> str:
        return f"lost for good: {[self.names[i] for i in self.lost]}, still restarting: {[self.names[i] for i in self.restarting]}"


__all__ = ["DIED", "END", "StreamError", "WorkerPool", "collect"]


def collect(worker: Any, requests: Sequence[GenerationRequest], timeout_s: float | None = None) -> list[Completion]:
    """Every completion of `requests` from one worker, in the order they finished (no fault handling: tests,
    benchmarks and one-off probes). Each wait is bounded by `timeout_s` (None: none)."""
    out: list[Completion] = []
    gen = worker.generate.options(num_returns="streaming").remote(list(requests))
    while True:
        if timeout_s is not None and not ray.wait([gen], timeout=timeout_s)[0]:
            raise TimeoutError(f"no completion within {timeout_s:.0f}s")
        try:
            ref = next(gen)
        except StopIteration:
            return out
        out.extend(ray.get(ref))
