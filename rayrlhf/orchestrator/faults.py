"""Fault tolerance on the driver: fault counters, hang dumps, heartbeats and the rollout worker pool.

What fails, and what the job does (the README's Reliability section says the same):

- a rollout worker dies, hangs (no sample for `generation_timeout`) or its engine fails: its
  unfinished requests go to the workers still in service at once (same request ids and seeds;
  samples that already came back are kept, late duplicates dropped), the worker is restarted by
  Ray (`faults.max_restarts`), and it serves again only after it received the current weights
  and they were verified;
- a reference or reward server dies or hangs (`score_timeout_s`): restarted, the call retried;
- a trainer rank dies or hangs (`train_timeout_s`): `TrainerFailed`; the loop rebuilds the
  trainer groups from the latest checkpoint (`faults.trainer_restarts` times);
- a hung actor's stacks go to the job log and to `output_dir/faults/`.

Every event is counted (`faults/...` in each metrics row, hence in the Prometheus metrics).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rayrlhf.actors.health import py_spy_dump

log = logging.getLogger(__name__)


@dataclass
class FaultCounters:
    """Events since the job started (carried in checkpoints, so a resumed job keeps counting)."""

    worker_failures: int = 0  # rollout workers found dead, hung or with a failed engine
    worker_restarts: int = 0  # rollout workers back in service after a restart (weights synced and verified)
    redispatched_samples: int = 0  # samples sent again, to another worker, after theirs failed
    server_restarts: int = 0  # reference / reward server calls retried after the server died or hung
    hangs: int = 0  # calls that ran past their timeout (the actor is then treated as dead)
    hang_dumps: int = 0  # stack dumps written to output_dir/faults/
    trainer_restarts: int = 0  # times the trainer groups were rebuilt from a checkpoint

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, key, getattr(self, key) + n)

    def row(self) -> dict[str, int]:
        return {f"faults/{f.name}": getattr(self, f.name) for f in fields(self)}

    def state_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


def dump_hang(name: str, ident: tuple[str, int] | None, folder: Path, counters: FaultCounters,
              actor: Any = None) -> Path | None:
    """Write the stacks of a hung actor to folder/hang-<name>-<time>.txt and the log.

    `py-spy dump` on the actor's node first (it reads a process stuck in C code too); else the
    actor's own `stacks()` method, when it has one and still answers.
    """
    text, why = None, []
    if ident is not None:
        node, pid = ident
        try:
            task = py_spy_dump.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(pid)
            text = ray.get(task, timeout=90)
        except Exception as exc:  # noqa: BLE001 - fall back to the actor's own report
            why.append(f"py-spy: {exc!r}")
    if text is None and actor is not None and hasattr(actor, "stacks"):
        try:
            text = ray.get(actor.stacks.remote(), timeout=10)
        except Exception as exc:  # noqa: BLE001
            why.append(f"stacks(): {exc!r}")
    if text is None:
        log.error("%s hung; no stack dump could be taken (%s)", name, "; ".join(why))
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"hang-{name}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    path.write_text(text)
    counters.add("hang_dumps")
    log.error("%s hung; its stacks (also in %s):\n%s", name, path, text[-6000:])
    return path


def wait_restarted(actor: Any, timeout_s: float) -> None:
    """Block until a restarting actor answers `ready()` again; raise if it is dead for good or not back in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return
        except ray.exceptions.ActorUnavailableError:  # calls fail at once while it restarts
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


class Heartbeat:
    """Logs what the driver is waiting on, every `every_s` seconds once a wait runs that long."""

    def __init__(self, every_s: float, what: str) -> None:
        self.every_s, self.what = every_s, what
        self.start = self.last = time.monotonic()

    def beat(self, detail: Callable[[], str]) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            log.warning("still waiting on %s after %.0f s: %s", self.what, now - self.start, detail())


class WorkerPool:
    """The rollout workers and which of them are in service.

    A worker that fails leaves service (`fail`); Ray restarts its actor in place (max_restarts),
    and `back()` reports it once its engine is up again. It re-enters service through `rejoin`,
    which the caller does only after pushing the current weights into it and verifying them.
    """

    def __init__(self, workers: Sequence[Any], counters: FaultCounters, folder: Path, hang_timeout_s: float,
                 restart_timeout_s: float, heartbeat_s: float) -> None:
        self.workers = list(workers)
        self.names = [f"rollout-{i}" for i in range(len(self.workers))]
        self.counters, self.folder = counters, folder
        self.hang_timeout_s, self.restart_timeout_s, self.heartbeat_s = hang_timeout_s, restart_timeout_s, heartbeat_s
        self.live: list[int] = list(range(len(self.workers)))
        self.lost: set[int] = set()
        self._restarting: dict[int, Any] = {}  # worker index -> its ready() call, answered once it is up
        self._idents: dict[int, tuple[str, int] | None] = {}
        self._lock = threading.RLock()
        for i, ident in enumerate(ray.get([w.identity.remote() for w in self.workers])):
            self._idents[i] = tuple(ident)

    def fail(self, i: int, reason: str, kill: bool, hung: bool = False) -> bool:
        """Take worker `i` out of service (dumping its stacks if it hung) and let Ray restart it.
        False when another caller already did."""
        with self._lock:
            if i in self._restarting or i in self.lost:
                return False
            if i in self.live:
                self.live.remove(i)
            self.counters.add("worker_failures")
        log.error("%s failed (%s); its unfinished samples go to the other workers, and it restarts", self.names[i], reason)
        if hung:
            self.counters.add("hangs")
            dump_hang(self.names[i], self._idents.get(i), self.folder, self.counters, self.workers[i])
        if kill:  # hung or a failed engine: end the process; Ray starts a fresh one (a dead actor restarts by itself)
            ray.kill(self.workers[i], no_restart=False)
        with self._lock:
            self._restarting[i] = self._ask(i)
        return True

    def _ask(self, i: int) -> Any:
        """An `identity()` call: answered once the restarted actor's constructor (its engine) is done."""
        return self.workers[i].identity.remote()

    def back(self, timeout_s: float = 0.0) -> list[int]:
        """Restarted workers whose engine is up (waiting up to `timeout_s` for the first); they are not in
        service until `rejoin`. A worker past its restarts is recorded as lost."""
        deadline = time.monotonic() + timeout_s
        while True:
            ready = self._poll()
            if ready or not self.restarting or time.monotonic() >= deadline:
                return ready
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def _poll(self) -> list[int]:
        with self._lock:
            pending = {ref: i for i, ref in self._restarting.items()}
        if not pending:
            return []
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        ready = []
        for ref in done:
            i = pending[ref]
            old = self._idents.get(i)
            try:
                ident = tuple(ray.get(ref))
            except ray.exceptions.ActorUnavailableError:  # still restarting
                ident = None
            except Exception as exc:  # noqa: BLE001 - out of restarts, or the engine cannot start
                log.error("%s is lost for good: %r", self.names[i], exc)
                with self._lock:
                    self._restarting.pop(i, None)
                    self.lost.add(i)
                continue
            if ident is None or ident == old:  # not restarted yet, or the old process answering before it is killed
                with self._lock:
                    self._restarting[i] = self._ask(i)
                continue
            with self._lock:
                self._restarting.pop(i, None)
            self._idents[i] = ident
            ready.append(i)
        return sorted(ready)

    def rejoin(self, i: int) -> None:
        """Put restarted worker `i` back in service (its weights are the current ones, verified)."""
        with self._lock:
            if i not in self.live:
                self.live = sorted([*self.live, i])
        self.counters.add("worker_restarts")
        log.warning("%s is back in service after a restart", self.names[i])

    @property
    def restarting(self) -> list[int]:
        with self._lock:
            return sorted(self._restarting)

    def in_service(self) -> list[Any]:
        with self._lock:
            return [self.workers[i] for i in self.live]
