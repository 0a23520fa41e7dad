"""Fault tolerance on the driver: one policy for every actor the driver waits on.

Rollout workers (`orchestrator/workers.py`), the reference and reward servers (`ServerCaller`) and the
trainer ranks (`actors/trainer_group.py`) all follow the same rules, kept here:

- every wait is bounded (`faults.*_timeout_s`); an actor that does not answer in time is hung: its
  stacks are dumped (`py-spy` on its node; the log and `output_dir/faults/`), then it is killed;
- what a failure means is decided once, by `classify`: the actor's process died, it is unavailable
  (restarting, or a transient outage), a call timed out, a collective failed because a peer went away,
  or the actor's own code raised;
- a failed actor is `Restartable`: taken out of service once per incarnation (two threads that see the
  same failure count it once), killed unless its process is already gone, and watched until a new
  process answers; an actor that answers again from the *same* process after an outage is killed then,
  so that it always comes back fresh (its state may hold abandoned work);
- trainer ranks cannot be replaced inside a ZeRO world: a dead or hung rank fails the group
  (`TrainerFailed`), and the loop rebuilds every group from the latest checkpoint.

Every event is counted (`faults/...` in each metrics row, hence in the Prometheus metrics).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rayrlhf.actors.health import COMM, DIED, ERROR, TIMEOUT, UNAVAILABLE, classify, py_spy_dump
from rayrlhf.config import FaultsConfig

log = logging.getLogger(__name__)

__all__ = ["COMM", "DIED", "ERROR", "TIMEOUT", "UNAVAILABLE", "classify"]  # the fault kinds, from actors/health.py


@dataclass
class FaultCounters:
    """Events since the job started (carried in checkpoints, so a resumed job keeps counting)."""

    worker_failures: int = 0  # rollout workers found dead, hung or with a failed engine
    worker_restarts: int = 0  # rollout workers back in service after a restart (weights synced and verified)
    redispatched_samples: int = 0  # samples sent again, to another worker, after theirs failed
    server_restarts: int = 0  # reference / reward servers restarted (the call was then made again)
    reward_restarts: int = 0  # reward-function child processes started again after they died or hung
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
            if key in {f.name for f in fields(self)}:
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


class FaultPolicy:
    """The timeouts, counters and dump folder every supervised actor shares."""

    def __init__(self, cfg: FaultsConfig, folder: Path, counters: FaultCounters | None = None,
                 max_new_tokens: int = 0) -> None:
        self.cfg, self.folder = cfg, folder
        self.counters = counters or FaultCounters()
        self.generation_timeout_s = cfg.generation_timeout_s + cfg.generation_timeout_per_token_s * max_new_tokens

    def hung(self, name: str, ident: tuple[str, int] | None, actor: Any = None) -> None:
        """Count a hang and dump the actor's stacks (blocks up to ~90 s: call off the critical path)."""
        self.counters.add("hangs")
        dump_hang(name, ident, self.folder, self.counters, actor)


class Restartable:
    """One restartable actor: which process serves it, and whether it is out of service and coming back.

    `take_out` is idempotent per incarnation: the first caller counts the failure, dumps a hung actor's
    stacks and kills it (in a background thread, so no caller waits on a dump); later callers see it is
    already out. `poll()` says when a new process answers.
    """

    def __init__(self, name: str, actor: Any, policy: FaultPolicy, ident: tuple[str, int] | None = None) -> None:
        self.name, self.actor, self.policy = name, actor, policy
        self.ident = ident if ident is not None else tuple(ray.get(actor.identity.remote(), timeout=policy.cfg.restart_timeout_s))
        self.incarnation = 0  # bumped each time a new process is confirmed
        self.out = False  # out of service, waiting for a new process
        self.lost: str | None = None  # why it will not come back
        self._probe: Any = None  # an identity() call, answered once the actor is up again
        self._killed = False  # this incarnation was killed by us (or died by itself)
        self._ready = False  # out of service, and a new process has answered
        self._lock = threading.Lock()
        self._handling: threading.Thread | None = None

    def take_out(self, reason: str, kind: str, incarnation: int | None = None) -> bool:
        """Out of service after a failure of `kind` (DIED, UNAVAILABLE, TIMEOUT, COMM, ERROR). False when it was
        already out, or when the failure belongs to an incarnation that has since been replaced."""
        with self._lock:
            if self.out or self.lost or (incarnation is not None and incarnation != self.incarnation):
                return False
            self.out, self._ready, self._probe = True, False, None
            self._killed = kind == DIED  # gone already: Ray restarts it by itself
        log.error("%s failed (%s); it restarts", self.name, reason[:600])

        def handle() -> None:
            if kind == TIMEOUT:
                self.policy.hung(self.name, self.ident, self.actor)
            # UNAVAILABLE: the process may be restarting already; poll() kills it if the old one answers again
            if kind in (TIMEOUT, ERROR, COMM):
                self._kill()
            with self._lock:
                self._probe = self.actor.identity.remote()

        self._handling = threading.Thread(target=handle, name=f"fault-{self.name}", daemon=True)
        self._handling.start()
        return True

    def _kill(self) -> None:
        with self._lock:
            self._killed = True
        try:
            ray.kill(self.actor, no_restart=False)
        except Exception as exc:  # noqa: BLE001 - already gone
            log.debug("ray.kill(%s): %r", self.name, exc)

    def poll(self) -> bool:
        """True when a process serves this actor: in service, or out and a new process has answered (ready to
        rejoin). Safe to call from several threads."""
        with self._lock:
            if not self.out or self._ready:
                return True
            probe, old = self._probe, self.ident
        if self.lost or probe is None:
            return False
        ready, _ = ray.wait([probe], timeout=0)
        if not ready:
            return False
        try:
            ident = tuple(ray.get(probe))
        except ray.exceptions.ActorUnavailableError:  # still restarting
            ident = None
        except Exception as exc:  # noqa: BLE001 - out of restarts, or its constructor cannot run
            with self._lock:
                self.lost = f"{type(exc).__name__}: {exc}"[:500]
            log.error("%s is lost for good: %s", self.name, self.lost)
            return False
        return self._settle(probe, old, ident)

    def _settle(self, probe: Any, old: tuple[str, int], ident: tuple[str, int] | None) -> bool:
        """Act on the answer `ident` to `probe`, sent while `old` served. Several threads may hold the same answer:
        only the first acts on it. (Before: a second thread compared it with the identity the first had just
        recorded, took the new process for the old one answering again, and killed it.)"""
        with self._lock:
            if not self.out or self._ready:
                return True  # another thread saw the new process first
            if probe is not self._probe:
                return False  # another thread acted on this answer already
            stale = ident is not None and ident == old and not self._killed
            if ident is not None and ident != old:
                self.ident, self.incarnation, self._killed, self._ready = ident, self.incarnation + 1, False, True
                return True
            self._probe = None if stale else self.actor.identity.remote()  # not restarted yet: ask again
        if stale:  # the old process answers again (a transient outage): it may hold abandoned work, so it restarts
            log.warning("%s answers again from the same process after an outage; restarting it", self.name)
            self._kill()
            with self._lock:
                self._probe = self.actor.identity.remote()
        return False

    def back_in_service(self) -> None:
        with self._lock:
            self.out, self._probe, self._ready = False, None, False

    def wait_back(self, timeout_s: float) -> None:
        """Block until a new process serves this actor (it stays out of service); raise when lost or too slow."""
        deadline = time.monotonic() + timeout_s
        while not self.poll():
            if self.lost:
                raise RuntimeError(f"{self.name} is lost for good ({self.lost})")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{self.name} did not restart within faults.restart_timeout_s={timeout_s:.0f}s")
            time.sleep(0.2)


class ServerCaller:
    """Calls into one frozen server (reference or reward), made again after the server died or hung.

    Several scoring threads may call the same server at once. A failure is handled once per incarnation
    (counted once, dumped once, killed once); every thread that saw it waits for the new process and makes
    its call again, up to faults.max_restarts restarts of this server in the job.
    """

    def __init__(self, restartable: Restartable) -> None:
        self.server = restartable
        self.restarts = 0
        self._lock = threading.Lock()

    def call(self, make_call: Callable[[], Any]) -> Any:
        """`make_call()` returns an ObjectRef; its value, waiting at most faults.score_timeout_s per attempt."""
        server, cfg = self.server, self.server.policy.cfg
        while True:
            incarnation = server.incarnation
            try:
                return ray.get(make_call(), timeout=cfg.score_timeout_s)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as exc:
                kind = classify(exc)
                why = (f"gave no answer within faults.score_timeout_s={cfg.score_timeout_s:.0f}s" if kind == TIMEOUT
                       else f"died ({type(exc).__name__})")
            with self._lock:
                if server.take_out(why, kind, incarnation):
                    self.restarts += 1
                    server.policy.counters.add("server_restarts")
                if self.restarts > cfg.max_restarts:
                    raise RuntimeError(f"{server.name} {why}, after {cfg.max_restarts} restart(s) (faults.max_restarts)")
            server.wait_back(cfg.restart_timeout_s)
            server.back_in_service()
            log.warning("%s is back (restart %d); the micro-batch is scored again", server.name, self.restarts)


class FailureBudget:
    """The share of samples that could not be scored (reward, environment or scoring failures) over the last
    `window` steps; past `max_frac` the job checkpoints and stops instead of training on nothing."""

    KEYS = ("reward/failed", "env/failed")

    def __init__(self, max_frac: float, window: int) -> None:
        self.max_frac, self.window = max_frac, window
        self._steps: list[tuple[int, int, int]] = []  # (step, failed, samples)

    def over(self, row: dict[str, Any]) -> str | None:
        """Record a step's row; a message when the budget is exceeded, else None."""
        failed = int(sum(row.get(k, 0) or 0 for k in self.KEYS))
        samples = int(row.get("rollout/samples", 0))
        if "rollout/drawn_samples" in row:  # dynamic sampling: every sample generated, the dropped groups' too
            failed, samples = int(row["rollout/drawn_failed"]), int(row["rollout/drawn_samples"])
        self._steps = [*self._steps, (int(row["step"]), failed, samples)][-self.window:]
        total = sum(n for _, _, n in self._steps)
        bad = sum(f for _, f, _ in self._steps)
        if total and bad / total > self.max_frac:
            first, last = self._steps[0][0], self._steps[-1][0]
            return (f"{bad} of {total} samples of steps {first}-{last} could not be scored ({bad / total:.0%}, over "
                    f"faults.max_failed_frac={self.max_frac:g}); see reward/failed (and env/failed) in metrics.jsonl "
                    "and the reward function's log")
        return None
